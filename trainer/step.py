"""One optimizer step (forward and backward of its micro-batches, clip, step), the held-out eval, and the numbers a
run reports."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trainer.logger import NullLogger
from trainer.runtime import Runtime, all_ranks
from trainer.stage import Batch, Stage


def step_shares(weights: list[float], rt: Runtime) -> list[float | torch.Tensor]:
    """Each micro-batch's share of the step's weight (its ``loss_weight``, on all ranks), times the world size
    because DDP averages gradients over ranks. One process: host floats. DDP: one small all-reduce of the step's
    total, copied to the device without a host sync (pinned memory on CUDA)."""
    if not rt.ddp:
        total = max(sum(weights), 1.0)
        return [w / total for w in weights]
    local = torch.tensor([sum(weights)])
    local = local.pin_memory() if rt.device.type == "cuda" else local
    total = all_ranks(rt, local.to(rt.device, non_blocking=True)).clamp(min=1)[0]
    return [w * rt.world_size / total for w in weights]


def accumulate(model: nn.Module, stage: Stage, micro_batches: list[Batch], scaler: torch.amp.GradScaler,
               progress: Progress, rt: Runtime) -> None:
    """Forward and backward each micro-batch of one step. Each counts by its share of the step's ``loss_weight``
    (supervised tokens, pairs) on all ranks: k micro-batches, or N GPUs, give one big batch's gradient."""
    shares = step_shares([float(stage.loss_weight(b)) for b in micro_batches], rt)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        # under DDP, gradients are all-reduced once per step, at the last micro-batch
        with model.no_sync() if rt.ddp and not last else contextlib.nullcontext():
            with rt.autocast():
                loss, metrics = stage.loss_fn(model, batch)
            scaler.scale(loss * shares[i]).backward()
        progress.add_micro_batch(loss, metrics, shares[i], batch["input_ids"].numel())


def optimizer_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   grad_clip: float) -> torch.Tensor:
    """Clip (when ``grad_clip`` > 0), step, zero the gradients; returns the gradient norm before clipping. Each of the
    optimizer's parameter groups is clipped on its own (one group in most stages; PPO's critic then cannot shrink the
    actor's step, as MiniMind's two optimizers clip apart). The norm, of all groups together, is checked like the loss:
    a finite loss can still backpropagate inf, and AdamW would then write NaN weights."""
    scaler.unscale_(optimizer)  # a no-op without fp16
    if grad_clip > 0:
        grad_norm = torch.stack([nn.utils.clip_grad_norm_(group["params"], grad_clip)
                                 for group in optimizer.param_groups]).norm()
    else:
        grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def evaluate(model: nn.Module, stage: Stage, data: Dataset, batch_size: int, rt: Runtime) -> dict[str, float]:
    """Mean loss (and metrics) over the held-out rows, in order, on this rank: per ``stage.loss_weight`` (tokens,
    pairs), so the last, smaller batch counts by its size."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    total = 0.0
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=stage.collate):
        weight = float(stage.loss_weight(batch))
        with rt.autocast():
            loss, metrics = stage.loss_fn(model, {k: v.to(rt.device) for k, v in batch.items()})
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * weight
        total += weight
    model.train()
    return {f"eval/{k}": v.item() / max(total, 1.0) for k, v in sums.items()}  # host sync, once per eval


def progress_text(record: dict[str, float]) -> str:
    """The bar's postfix: the losses (4 significant digits: 4.001 stays 4.001), lr, speed and MFU. Short enough to
    leave the bar room on a 140-column terminal; a stage's own metrics (DPO's rewards, the gradient norm) go to the
    logger and the history."""
    text = f"loss {record['loss']:#.4g}"
    text += f" eval_loss {record['eval/loss']:#.4g}" if "eval/loss" in record else ""
    text += f" lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s"
    return text + (f" mfu {record['mfu']:.1%}" if "mfu" in record else "")


class Progress:
    """A run's numbers. Between log points the loss and metric sums stay on the device (adding to them costs no host
    sync); at a log point ``read`` turns them into means over the window and all ranks, and ``log`` shows them on the
    bar, sends them to the logger and keeps them in ``history``."""

    def __init__(self, rt: Runtime, bar: Any, logger: NullLogger, mfu_per_token_per_s: float | None):
        """``mfu_per_token_per_s``: the share of the GPU's peak one token per second uses (None: no MFU shown)."""
        self.rt, self.bar, self.logger, self.mfu_per_token_per_s = rt, bar, logger, mfu_per_token_per_s
        self.history: list[dict[str, float]] = []  # one record per log point
        self.tokens_total = 0
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.tokens = 0
        self.step_loss = torch.zeros((), device=self.rt.device)
        self.first_bad = torch.tensor(float("inf"), device=self.rt.device)  # first step with a NaN/inf loss or grad
        self.started = time.time()

    def add_micro_batch(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], share: float | torch.Tensor,
                        tokens: int) -> None:
        """``share``: the micro-batch's weight in the step's mean, times the world size (read() divides by it)."""
        self.step_loss += loss.detach().float() * share  # the logged loss: mean over the whole step
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float() * share
        self.tokens += tokens

    def end_step(self, step: int, grad_norm: torch.Tensor | None) -> None:
        """``grad_norm``: None under fp16, where an inf gradient is routine (the GradScaler skips that step) and would
        make the logged mean inf."""
        finite = torch.isfinite(self.step_loss)
        if grad_norm is not None:
            finite &= torch.isfinite(grad_norm)
            self.sums["grad_norm"] = self.sums.get("grad_norm", 0) + grad_norm.detach().float()
        self.first_bad = torch.where(finite, self.first_bad, self.first_bad.clamp(max=step))
        self.sums["loss"] = self.sums.get("loss", 0) + self.step_loss
        self.step_loss = torch.zeros_like(self.step_loss)
        self.steps += 1

    def read(self, step: int, lr: float) -> tuple[dict[str, float], int | None]:
        """The window's record (means over it and all ranks, tokens/s, MFU) and its first NaN/inf step (None if
        none); then a new window starts. A host sync: once per log point."""
        names = list(self.sums)
        means = all_ranks(self.rt, torch.stack([self.sums[k] for k in names]) / self.steps) / self.rt.world_size
        first_bad = all_ranks(self.rt, self.first_bad.clone(), dist.ReduceOp.MIN).item()
        tokens = self.tokens * self.rt.world_size
        record = {k if k == "loss" else f"train/{k}": v for k, v in zip(names, means.tolist())}
        record["tokens_per_s"] = tokens / (time.time() - self.started)
        record.update(step=step, lr=lr)
        if self.mfu_per_token_per_s:
            record["mfu"] = record["tokens_per_s"] * self.mfu_per_token_per_s
        self.tokens_total += tokens
        self._reset()
        return record, (None if first_bad == float("inf") else int(first_bad))

    def went_bad(self) -> bool:
        """Whether a step of this window had a NaN/inf loss or gradient (a host sync: for when the run stops)."""
        return self.first_bad.item() != float("inf")

    def log(self, record: dict[str, float]) -> None:
        self.history.append(record)
        self.logger.log(record, int(record["step"]))
        self.bar.set_postfix_str(progress_text(record))

    def restart_clock(self) -> None:
        """The next window's speed leaves out what happened since it ended (an eval, a save)."""
        self.started = time.time()
