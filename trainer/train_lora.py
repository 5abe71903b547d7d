"""Stage 3a, LoRA: train a small low-rank update beside each frozen weight of the full-SFT model, on chat data.

    python trainer/train_lora.py --lora_name identity        # after train_full_sft.py; no data or no GPU: demo-sized
    python trainer/train_lora.py --lora_name identity --lora_type dora                       # DoRA instead of LoRA
    python trainer/train_lora.py --lora_name identity --mix_data dataset/demo/sft.jsonl      # + 20 % general chats
    python trainer/train_lora.py --lora_name medical --data_path dataset/lora_medical.jsonl   # GPU: MiniMind's recipe
    torchrun --nproc_per_node 2 trainer/train_lora.py --lora_name identity                   # DDP

Only the adapter is saved, to out/lora/lora_<name>_<hidden>[_moe].pth (a few MB); the base stays out/full_sft_*.pth.
"""

from argparse import Namespace
from pathlib import Path

import torch.distributed as dist
from torch import nn

from dataset import resolve_data_path
from dataset import files as data_files
from model import MiniMindConfig
from model.model_lora import DEFAULT_TARGETS, LAYER_TYPES, apply_lora, lora_path, lora_summary, save_lora
from trainer import Stage, build_parser, parse_args, run
from trainer.args import fail
from trainer.chat_data import add_chat_data_args, chat_data, check_chat_data_args


DEFAULT_NAME = "identity"  # the only name with a bundled demo set to fall back on


def lora_file(args: Namespace) -> Path:
    """--data_path, else dataset/lora_<name>.jsonl (MiniMind's lora_medical.jsonl for --lora_name medical).

    Only the default name falls back to the bundled identity set: an adapter named medical but trained on identity
    data would be a silent lie, so another name without its file is an error (a usage error, via parse_args)."""
    name = f"lora_{args.lora_name}.jsonl"
    if args.data_path is None and args.lora_name != DEFAULT_NAME and not (data_files.DATA_DIR / name).is_file():
        get = (f"Download it with: {data_files.DOWNLOAD_HINT.format(name=name)}" if name in data_files.KNOWN_FILES
               else f"MiniMind publishes no {name} (scripts/download_data.py --list shows what it does): write it")
        raise FileNotFoundError(
            f"--lora_name {args.lora_name}: no {data_files.DATA_DIR / name}. {get}; or pass --data_path FILE "
            f"(only --lora_name {DEFAULT_NAME} falls back to the bundled demo set)")
    return resolve_data_path(args.data_path, [name], "lora_identity.jsonl")


def add_lora(model: nn.Module, args: Namespace) -> None:
    """Wrap the target layers and freeze everything else: the engine's optimizer then holds the LoRA matrices only."""
    targets = "square" if args.lora_targets == ["square"] else args.lora_targets
    wrapped = apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, targets=targets, lora_type=args.lora_type)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{lora_summary(model)}: rank {args.lora_rank} on {len(wrapped)} layers", flush=True)


def adapter_path(args: Namespace, config: MiniMindConfig) -> Path:
    return lora_path(args.lora_name, config, args.out_dir)


LORA = Stage("lora", chat_data, setup=add_lora, weights_path=adapter_path, save_weights=save_lora)


def parse(argv: list[str] | None = None) -> Namespace:
    parser = build_parser(__doc__, epochs=10, batch_size=32, learning_rate=1e-4, max_seq_len=340, log_interval=10,
                          from_weight="full_sft", wandb_project="MiniMind-LoRA")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_name", default=DEFAULT_NAME,
                      help="the adapter's name: out/lora/lora_<name>_<hidden>.pth; without --data_path it trains on "
                      "dataset/lora_<name>.jsonl (identity: the bundled demo set if that file is missing)")
    lora.add_argument("--lora_type", default="lora", choices=list(LAYER_TYPES),
                      help="dora: DoRA (Liu et al. 2024), a trainable magnitude per output feature besides A and B; "
                      "the file records the type, so loading and merging need no flag")
    lora.add_argument("--lora_rank", type=int, default=16)
    lora.add_argument("--lora_alpha", type=float, default=None,
                      help="the update is scaled by alpha/rank (default: alpha = rank, unscaled as in MiniMind)")
    lora.add_argument("--lora_targets", nargs="+", default=list(DEFAULT_TARGETS),
                      help="layer names or regexes to adapt, or 'square' (MiniMind's choice: q_proj/o_proj with GQA)")
    add_chat_data_args(parser)
    # The bundled identity set is small: at 1e-4 a few hundred steps barely move a rank-16 adapter.
    args = parse_args(parser, argv, lora_file, demo=dict(batch_size=8, max_seq_len=256, learning_rate=1e-3,
                                                         max_steps=150, log_interval=10, eval_interval=50,
                                                         eval_size=16))
    if args.save_hf:
        fail("--save_hf: a LoRA run saves the adapter only; merge it into the base (merge_lora) to export")
    check_chat_data_args(args)
    return args


def main(argv: list[str] | None = None) -> None:
    run(LORA, parse(argv))


if __name__ == "__main__":
    main()
