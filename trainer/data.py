"""The rows a run trains on: split from the held-out rows, checked, planned into steps, and served in an order that a
resumed run can pick up at any step."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dataset import DataError, MixedRows, train_eval_split
from trainer.runtime import Runtime, all_ranks, ignore_ctrl_c
from trainer.stage import Batch, supervised_tokens

Collate = Callable[[list[Batch]], Batch]


def split_data(dataset: Dataset, eval_size: int, seed: int, collate: Collate, rt: Runtime, source: str) \
        -> tuple[Dataset, Dataset | None]:
    """``dataset`` (read from ``source``) as (train, held-out eval or None), checked for what would make a run
    pointless. Mixed rows (--mix_data) hold out rows of their main file only, then mix into its training rows."""
    mixed = dataset if isinstance(dataset, MixedRows) else None
    dataset = mixed.main if mixed else dataset
    if len(dataset) == 0:
        raise DataError(f"{source} has no rows")
    if eval_size >= len(dataset):
        raise DataError(f"--eval_size {eval_size} leaves no rows to train on: the data has {len(dataset)}; "
                        f"lower it (0: no held-out eval)")
    train_set, eval_set = train_eval_split(dataset, eval_size=eval_size, seed=seed) if eval_size else (dataset, None)
    if left_out := len(dataset) - len(train_set) - len(eval_set or []):
        rt.print(f"[data] {left_out} rows share a document with held-out rows: left out of training, so the eval "
                 f"loss is on unseen text")
    if not train_set:
        raise DataError(f"--eval_size {eval_size} leaves no rows to train on (with the {left_out} that share "
                        f"their documents); lower it (0: no held-out eval)")
    train_set = mixed.over(train_set) if mixed else train_set
    if rt.is_main:
        check_supervision(train_set, collate, rt)
    return train_set, eval_set


def check_supervision(data: Dataset, collate: Collate, rt: Runtime, sample: int = 64) -> None:
    """Warn when sampled rows have no supervised token (a reply cut off by --max_seq_len): they train nothing."""
    picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:sample].tolist()
    batches = [collate([data[i]]) for i in picks]
    if any("labels" not in batch for batch in batches):
        return  # nothing to check (such a stage says what its loss is a mean over: Stage.loss_weight)
    empty = sum(supervised_tokens(batch) == 0 for batch in batches)
    if empty:
        rt.print(f"[data] warning: {empty} of {len(picks)} sampled rows have no supervised token within --max_seq_len "
                 f"(the reply is cut off): they train nothing. Raise --max_seq_len, or shorten the prompts.")


@dataclass
class Plan:
    """How many optimizer steps a run makes, of how many rows."""

    batch_size: int  # rows per micro-batch per rank
    accumulation_steps: int  # micro-batches per step
    world_size: int
    steps_per_epoch: int  # each epoch drops its last partial step
    epochs: int
    max_steps: int  # 0: all epochs

    @property
    def global_batch(self) -> int:
        """Rows per step, on all ranks together."""
        return self.batch_size * self.accumulation_steps * self.world_size

    @property
    def total(self) -> int:
        all_epochs = self.epochs * self.steps_per_epoch
        return min(self.max_steps, all_epochs) if self.max_steps else all_epochs

    def describe(self) -> str:
        """The steps the run makes and what decided their number, e.g. "212 steps of 8 rows (2 epochs of 106;
        --max_steps 300 is more than the data makes)"."""
        all_epochs = self.epochs * self.steps_per_epoch
        if self.max_steps and self.max_steps < all_epochs:
            why = f"--max_steps {self.max_steps}; an epoch is {self.steps_per_epoch}"
        else:
            why = f"{self.epochs} epoch{'s' * (self.epochs > 1)} of {self.steps_per_epoch}"
            why += f"; --max_steps {self.max_steps} is more than the data makes" if self.max_steps > all_epochs else ""
        return f"{self.total} steps of {self.global_batch} rows ({why})"


def plan_steps(train_rows: int, batch_size: int, accumulation_steps: int, world_size: int, epochs: int,
               max_steps: int) -> Plan:
    steps_per_epoch = math.ceil(train_rows / world_size) // batch_size // accumulation_steps
    plan = Plan(batch_size, accumulation_steps, world_size, steps_per_epoch, epochs, max_steps)
    if steps_per_epoch == 0:
        raise DataError(f"{train_rows} training rows make no step of {plan.global_batch} rows (batch_size x "
                        f"accumulation_steps x GPUs): lower --batch_size, --accumulation_steps or --eval_size, or add "
                        f"data")
    return plan


def epoch_order(data: Dataset, seed: int, epoch: int, rt: Runtime) -> list[int]:
    """This rank's rows of one epoch, in order. A function of (seed, epoch) only, so a resumed run skips exactly the
    rows it already trained on and then sees the same batches as an uninterrupted one."""
    sampler = DistributedSampler(data, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def report_mix(data: MixedRows, trained: list[int], epoch: int, rt: Runtime) -> None:
    """Print the share of the epoch's trained rows (all ranks) that come from the mix file: the asked one up to
    rounding and the partial step each epoch drops."""
    mixed, rows = all_ranks(rt, torch.tensor([data.mixed_in(trained), len(trained)], device=rt.device)).tolist()
    rt.print(f"[mix] epoch {epoch + 1}: {mixed} of {rows} rows ({mixed / max(rows, 1):.1%}) from --mix_data "
             f"(--mix_ratio {data.ratio:g})")


def epoch_loader(data: Dataset, batch_size: int, collate: Collate, rows: list[int], num_workers: int | None,
                 rt: Runtime) -> DataLoader:
    """This rank's batches of ``rows`` (of one epoch, less those a resumed run has trained on)."""
    workers = num_workers if num_workers is not None else (0 if rt.device.type == "cpu" else 4)
    return DataLoader(data, batch_size=batch_size, sampler=rows, collate_fn=collate,
                      drop_last=True, num_workers=workers, pin_memory=rt.device.type == "cuda",
                      worker_init_fn=ignore_ctrl_c,
                      generator=torch.Generator())  # own generator: creating a loader leaves the global RNG alone


def step_batches(data: Dataset, plan: Plan, start_step: int, collate: Collate, seed: int, num_workers: int | None,
                 rt: Runtime) -> Iterator[Iterator[Batch]]:
    """For each optimizer step from ``start_step`` on, its ``accumulation_steps`` micro-batches (the caller stops
    at ``plan.total``)."""
    step_rows = plan.accumulation_steps * plan.batch_size  # per rank
    for epoch in itertools.count(start_step // plan.steps_per_epoch):
        done = max(0, start_step - epoch * plan.steps_per_epoch)
        order = epoch_order(data, seed, epoch, rt)
        if isinstance(data, MixedRows):
            data.set_epoch(epoch)  # this epoch's draw, before the loader (and its workers) take the dataset
            report_mix(data, order[:plan.steps_per_epoch * step_rows], epoch, rt)
        batches = iter(epoch_loader(data, plan.batch_size, collate, order[done * step_rows:], num_workers, rt))
        for _ in range(done, plan.steps_per_epoch):
            yield itertools.islice(batches, plan.accumulation_steps)
