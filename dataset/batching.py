"""Batching and the held-out split. Items are dicts of 1-D LongTensors, `input_ids` and `labels` (aligned: the model
shifts internally; IGNORE_INDEX = no loss)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

IGNORE_INDEX = -100  # the label of a position without loss (torch's cross_entropy default ignore_index)


def pad_collate(batch: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad every key of a list of items to one common length: `*labels` with IGNORE_INDEX, the rest with pad_id.

    One length for all keys lets a DPO step concatenate chosen and rejected into one forward pass. No attention
    mask is needed: padding is on the right and attention is causal, so real tokens never see pad tokens, and
    pad positions carry no loss. (Do not derive a mask from `input_ids != pad_id`: the document separator of
    pretraining is id 0 too.)
    """
    length = max(x.numel() for item in batch for x in item.values())
    out = {}
    for key in batch[0]:
        fill = IGNORE_INDEX if key.endswith("labels") else pad_id
        padded = torch.full((len(batch), length), fill, dtype=torch.long)
        for row, item in enumerate(batch):
            padded[row, :item[key].numel()] = item[key]
        out[key] = padded
    return out


def train_eval_split(dataset: Dataset, eval_fraction: float | None = None, eval_size: int | None = None,
                     seed: int = 0) -> tuple[Subset, Subset]:
    """A deterministic held-out split: (train, eval) Subsets; give eval_fraction or eval_size.

    The eval rows are a random sample. Where rows cut documents (packed pretraining), training leaves out every
    row that shares a document with an eval row, so the eval loss is on text the model has not seen."""
    if (eval_fraction is None) == (eval_size is None):
        raise ValueError("give exactly one of eval_fraction or eval_size")
    n = len(dataset)
    n_eval = eval_size if eval_size is not None else max(1, round(n * eval_fraction))
    if not 0 < n_eval < n:
        raise ValueError(f"eval size {n_eval} must be between 1 and {n - 1} for a dataset of {n} items")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out, train = order[:n_eval], order[n_eval:]
    if hasattr(dataset, "rows_sharing_documents"):
        shared = dataset.rows_sharing_documents(held_out)
        train = [i for i in train if not shared[i]]
    return Subset(dataset, train), Subset(dataset, held_out)
