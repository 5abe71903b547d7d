"""Batching and the held-out split. Items are dicts of 1-D LongTensors, `input_ids` and `labels` (aligned: the model
shifts internally; IGNORE_INDEX = no loss)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset, Subset


log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label of a position without loss (torch's cross_entropy default ignore_index)
# how many training rows a held-out split may leave out for sharing a document with a held-out row
LEFT_OUT_PER_HELD_OUT = 8  # per held-out row (a row of short documents leaves out 2: its neighbours)
LEFT_OUT_SHARE = 0.25  # and of all rows


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

    The eval rows are a random sample. Where rows cut documents (packed pretraining: the dataset has
    ``shared_row_spans``), training leaves out every row that shares a document with an eval row, so the eval loss
    is on text the model has not seen. A row of a long document would take the whole document out of training (one
    document of 455,108 rows once left 54 to train on), so the sample passes over a row whose document would leave
    out more rows than the cap: LEFT_OUT_PER_HELD_OUT per eval row, and at most LEFT_OUT_SHARE of all rows. It says
    so when it does, and holds out fewer rows than asked when no more fit; when none fits, the one row that leaves out
    the fewest (the caller reports how many rows are left out, and stops when none is left to train on)."""
    if (eval_fraction is None) == (eval_size is None):
        raise ValueError("give exactly one of eval_fraction or eval_size")
    n = len(dataset)
    n_eval = eval_size if eval_size is not None else max(1, round(n * eval_fraction))
    if not 0 < n_eval < n:
        raise ValueError(f"eval size {n_eval} must be between 1 and {n - 1} for a dataset of {n} items")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if not hasattr(dataset, "shared_row_spans"):  # rows share no text
        return Subset(dataset, order[n_eval:]), Subset(dataset, order[:n_eval])
    first, last = dataset.shared_row_spans()
    cap = min(LEFT_OUT_PER_HELD_OUT * n_eval, int(n * LEFT_OUT_SHARE))
    taken = np.zeros(n, dtype=bool)  # held out, or left out of training for sharing a document with a held-out row
    held_out: list[int] = []
    left_out = passed_over = 0
    for row in order:  # the random order: while nothing is passed over, the held-out rows are its first n_eval
        if len(held_out) == n_eval:
            break
        span = slice(int(first[row]), int(last[row]) + 1)
        # Holding `row` out leaves out the rows of its span not taken yet, less itself (held out, not left out):
        # at least width - 1 - (rows taken so far), which passes over a huge span without counting through it.
        width = span.stop - span.start
        if width - 1 - (left_out + len(held_out)) <= cap - left_out:
            added = width - int(taken[span].sum()) - 1
            if left_out + added <= cap:
                taken[span] = True
                held_out.append(row)
                left_out += added
                continue
        passed_over += 1
    none_fits = not held_out
    if none_fits:  # the row that leaves out the fewest (the caller says how many that leaves out)
        row = order[int(np.argmin((last - first)[order]))]
        taken[first[row]:last[row] + 1] = True
        held_out.append(row)
    if passed_over:
        log.warning("held-out rows: passed over %d row(s) of documents so long that holding one out would leave "
                    "more than %d rows out of training; %d of the %d rows asked for are held out%s", passed_over, cap,
                    len(held_out), n_eval, ", one that leaves out more, as none fits" if none_fits else "")
    return Subset(dataset, [i for i in order if not taken[i]]), Subset(dataset, held_out)
