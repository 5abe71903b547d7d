"""The chat-data flags full SFT and LoRA share: which assistant turns are learned, empty think blocks, and general rows
mixed into a domain run so it does not forget how to chat."""

from __future__ import annotations

import argparse
from typing import Any

from torch.utils.data import Dataset

from dataset import DataError, MixedRows, SFTDataset, resolve_data_path
from dataset.chat import LOSS_TURNS
from trainer.args import fail

DEFAULT_MIX_RATIO = 0.2  # practice: 15-30 % general rows keep a narrow fine-tune chatting


def add_chat_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("chat data")
    g.add_argument("--loss_turns", default="all", choices=LOSS_TURNS,
                   help="which assistant turns are learned: all, or only the last reply (its thinking and tool calls "
                        "included; earlier turns are context)")
    g.add_argument("--empty_think_ratio", type=float, default=0.0,
                   help="share of rows whose replies without reasoning show an empty <think> block, so the model "
                        "also answers directly after one (--open_thinking 0); minimind-3 uses 0.2")
    g.add_argument("--mix_data", default=None,
                   help="a second SFT file of general chats mixed into every epoch (the held-out rows stay from "
                        "--data_path)")
    g.add_argument("--mix_ratio", type=float, default=None,
                   help=f"share of each epoch's rows drawn from --mix_data (default: {DEFAULT_MIX_RATIO}); a new draw "
                        f"each epoch, fixed by --seed")


def check_chat_data_args(args: argparse.Namespace) -> None:
    """Shares between 0 and 1; --mix_ratio only with --mix_data, which must be a file (resolved like --data_path)."""
    if not 0 <= args.empty_think_ratio <= 1:
        fail(f"--empty_think_ratio is a share of rows, from 0 to 1, not {args.empty_think_ratio}")
    if args.mix_data is None:
        if args.mix_ratio is not None:
            fail("--mix_ratio needs --mix_data (the file its rows are drawn from)")
        return
    args.mix_ratio = DEFAULT_MIX_RATIO if args.mix_ratio is None else args.mix_ratio
    if not 0 < args.mix_ratio < 1:
        fail(f"--mix_ratio must be between 0 and 1 (exclusive), got {args.mix_ratio:g}")
    try:
        args.mix_data = str(resolve_data_path(args.mix_data, [], "sft.jsonl"))
    except FileNotFoundError as e:
        fail(f"--mix_data: {e}")


def chat_data(args: argparse.Namespace, tokenizer: Any) -> Dataset:
    """The SFT rows of --data_path, with --mix_data's rows mixed into each epoch when it is given."""
    def rows(path: str) -> SFTDataset:
        return SFTDataset(path, tokenizer, args.max_seq_len, skip_bad_lines=args.skip_bad_lines,
                          cache_dir=args.cache_dir, empty_think_ratio=args.empty_think_ratio,
                          loss_turns=args.loss_turns)

    main = rows(args.data_path)
    if not args.mix_data:
        return main
    mix = rows(args.mix_data)
    try:
        mix.check_first_row()
    except DataError as e:
        raise DataError(f"--mix_data: {e} (the mix file must hold SFT rows, as --data_path does)") from None
    return MixedRows(main, mix, args.mix_ratio, args.seed)
