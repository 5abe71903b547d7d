"""What a stage script hands the engine: a ``Stage`` (its name, its dataset, its loss) and the defaults most stages
keep (next-token loss, counted by supervised tokens, saved as MiniMind's ``out/<name>_<hidden>.pth``)."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from dataset import IGNORE_INDEX, pad_collate
from model import MiniMindConfig
from model.files import checkpoint_path
from model.weights import save_weights
from trainer.runtime import Runtime

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross entropy on the positions whose label is not IGNORE_INDEX (+ the MoE balancing loss)."""
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"))
    return out.loss, ({"aux_loss": out.aux_loss} if out.aux_loss is not None else {})


def supervised_tokens(batch: Batch) -> int:
    """The positions ``lm_loss`` averages over (the model shifts labels by one). Read on the host, before the batch
    goes to the device: no sync."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def stage_weights_path(args: Namespace, config: MiniMindConfig) -> Path:
    """MiniMind's name for the weights a run writes: ``out/<save_weight>_<hidden>[_moe].pth``."""
    return checkpoint_path(args.save_weight, config, args.out_dir)


@dataclass
class Stage:
    """What makes a stage itself. The engine trains the parameters that still require grad after ``setup``."""

    name: str  # "pretrain", "full_sft", ...: a resume file of another stage is refused
    build_dataset: Callable[[Namespace, Any], Dataset]  # (args, tokenizer) -> items of 1-D LongTensors
    loss_fn: LossFn = lm_loss  # (model, batch) -> (loss, extra metrics); also used for the held-out eval
    # How many things loss_fn's mean is over, per batch, read on the host: batches count by it, so accumulation, DDP
    # and eval give the mean of one big batch. The default reads "labels"; a loss that is a mean over something else
    # says so (DPO: pairs; a loss per row: rows).
    loss_weight: Callable[[Batch], float] = supervised_tokens
    setup: Callable[[nn.Module, Namespace], None] | None = None  # after --from_weight, on the device: freeze, add LoRA
    weights_path: Callable[[Namespace, MiniMindConfig], Path] = stage_weights_path
    save_weights: Callable[[nn.Module, Path], Any] = save_weights  # what goes into the weights file
    collate: Callable[[list[Batch]], Batch] = pad_collate
    # RL (trainer/rollout.py): (model, one step's data micro-batches, step, runtime) -> the micro-batches of each
    # optimizer step made on them: GRPO samples and scores replies to the prompts and makes one step on them, PPO
    # several. None: one step on the data micro-batches as they are.
    rollout: Callable[[nn.Module, list[Any], int, Runtime], Iterable[list[Batch]]] | None = None
    # The optimizer's parameter groups (after setup); a group's "lr_scale" multiplies the scheduled LR (PPO: the
    # critic's own LR). None: one group of every parameter that requires grad.
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None
