"""Stage 2, full supervised fine-tuning: every weight trains on chat data; the loss is on assistant turns only.

    python trainer/train_full_sft.py                         # after train_pretrain.py; no data or no GPU: demo-sized
    python trainer/train_full_sft.py --data_path dataset/sft_mini_512.jsonl   # GPU: MiniMind's recipe
    python trainer/train_full_sft.py --data_path dataset/sft_t2t_mini.jsonl --empty_think_ratio 0.2   # minimind-3's
    python trainer/train_full_sft.py --data_path domain.jsonl --mix_data dataset/sft_mini_512.jsonl --mix_ratio 0.2
"""

from argparse import Namespace
from pathlib import Path

from dataset import resolve_data_path
from trainer import Stage, build_parser, parse_args, run
from trainer.chat_data import add_chat_data_args, chat_data, check_chat_data_args


def sft_file(args: Namespace) -> Path:
    return resolve_data_path(args.data_path, ["sft_t2t_mini.jsonl", "sft_mini_512.jsonl"], "sft.jsonl")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__, epochs=2, batch_size=16, learning_rate=1e-5, max_seq_len=768,
                          from_weight="pretrain", save_weight="full_sft", wandb_project="MiniMind-Full-SFT")
    add_chat_data_args(parser)
    # The demo pretrain is short: at MiniMind's 1e-5 a few hundred SFT steps change nothing visible.
    args = parse_args(parser, argv, sft_file, demo=dict(batch_size=8, max_seq_len=256, learning_rate=1e-4,
                                                        max_steps=200, log_interval=10, eval_interval=100,
                                                        eval_size=32))
    check_chat_data_args(args)
    run(Stage("full_sft", chat_data), args)


if __name__ == "__main__":
    main()
