"""Stage 1, pretraining: next-token prediction on plain text ({"text": ...} jsonl).

    python trainer/train_pretrain.py                         # no data or no GPU: a demo-sized run on the bundled corpus
    python trainer/train_pretrain.py --data_path dataset/pretrain_hq.jsonl   # GPU: MiniMind's recipe
    torchrun --nproc_per_node 8 trainer/train_pretrain.py    # DDP
"""

from argparse import Namespace
from pathlib import Path

from dataset import PretrainDataset, resolve_data_path
from trainer import Stage, build_parser, parse_args, run


def pretrain_file(args: Namespace) -> Path:
    return resolve_data_path(args.data_path, ["pretrain_t2t_mini.jsonl", "pretrain_hq.jsonl"], "pretrain.jsonl")


def pretrain_data(args: Namespace, tokenizer) -> PretrainDataset:
    return PretrainDataset(args.data_path, tokenizer, args.max_seq_len, mode="pad" if args.pad else "pack",
                           skip_bad_lines=args.skip_bad_lines, doc_mask=args.doc_mask, cache_dir=args.cache_dir)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__, epochs=2, batch_size=32, learning_rate=5e-4, accumulation_steps=8,
                          max_seq_len=340, save_weight="pretrain", wandb_project="MiniMind-Pretrain")
    parser.add_argument("--pad", action="store_true", help="one document per row, padded (default: packed rows)")
    parser.add_argument("--doc_mask", action="store_true",
                        help="packed rows: attend within each document only (positions restart per document)")
    args = parse_args(parser, argv, pretrain_file, demo=dict(batch_size=8, accumulation_steps=1, max_seq_len=256,
                                                             max_steps=300, log_interval=10, eval_interval=100,
                                                             eval_size=64))
    run(Stage("pretrain", pretrain_data), args)


if __name__ == "__main__":
    main()
