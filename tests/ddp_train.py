"""A tiny training run on synthetic token rows: the engine with no data file behind it.

Imported by the engine tests; run as a script (under torchrun too) by the DDP test:
    python tests/ddp_train.py HISTORY.json --out_dir DIR [flags]
"""

import json
import os
import sys
from argparse import Namespace

import torch
from torch.utils.data import Dataset

from trainer import Stage, build_parser, train
from trainer.runtime import shutdown


class TokenRows(Dataset):
    """``n`` rows of ``T`` random token ids, fixed by ``seed``. ``prompts``: each row starts with an unsupervised
    prompt of random length (label -100), so rows hold different numbers of supervised tokens, as in SFT."""

    def __init__(self, n: int = 64, T: int = 32, seed: int = 0, prompts: bool = False):
        generator = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(3, 6400, (n, T), generator=generator)
        self.labels = self.rows.clone()
        if prompts:
            prompt_lengths = torch.randint(1, T, (n,), generator=generator)
            self.labels[torch.arange(T) < prompt_lengths[:, None]] = -100

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.labels[i]}


def tiny_args(*flags: str) -> Namespace:
    """A 2-layer, 64-wide fp32 CPU run that logs every step; later flags win."""
    base = ["--hidden_size", "64", "--num_hidden_layers", "2", "--batch_size", "4", "--max_steps", "6",
            "--learning_rate", "1e-3", "--log_interval", "1", "--eval_size", "0", "--dtype", "float32",
            "--device", "cpu", "--save_weight", "pretrain"]
    return build_parser("tiny run").parse_args(base + list(flags))


def token_rows(args: Namespace, tokenizer) -> TokenRows:
    return TokenRows()


def prompt_rows(args: Namespace, tokenizer) -> TokenRows:
    return TokenRows(prompts=True)


if __name__ == "__main__":
    history_file, flags = sys.argv[1], sys.argv[2:]
    result = train(Stage("pretrain", prompt_rows), tiny_args(*flags))  # rows of unequal supervised length
    if int(os.environ.get("RANK", 0)) == 0:
        with open(history_file, "w") as f:
            json.dump(result.history, f)
    shutdown(0)
