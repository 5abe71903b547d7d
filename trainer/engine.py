"""The one training loop every stage shares.

A stage (pretrain, full SFT, LoRA, DPO) is a ``Stage``: its name, its dataset, its loss as a function of model and
batch, and optional hooks. Everything else lives here, once: device/dtype/DDP, the cosine LR schedule, gradient
accumulation, clipping, held-out eval, progress (loss, lr, tok/s, MFU, ETA), logging, atomic checkpoints, exact
resume and the NaN guard.

    stage = Stage("pretrain", build_dataset=lambda args, tok: PretrainDataset(...))
    run(stage, args)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import sys
import time
from argparse import Namespace
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from dataset import IGNORE_INDEX, DataError, MixedRows, pad_collate, train_eval_split
from model import MiniMindConfig, MiniMindForCausalLM
from model.flops import flops_per_token, peak_tflops
from model.files import SaveError, checkpoint_path, out_dir, resolve_path
from model.hf_interop import save_transformers
from model.loading import load_tokenizer, looks_like_path
from model.weights import CheckpointMismatch, load_state_dict_into, load_weights, save_weights
from trainer.args import model_config
from trainer.checkpoint import load_resume, resume_path, save_resume, set_rng_state, shape_of
from trainer.logger import make_logger
from trainer.runtime import Runtime, setup_runtime, shutdown

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


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; nothing was saved after it."""


@dataclass
class Result:
    steps: int
    tokens: int
    seconds: float
    history: list[dict[str, float]]  # one record per logged step: step, loss, lr, tokens_per_s, train/*, eval/*


# ----------------------------------------------------------------------------------------------------------------------
# the pieces


def lr_at(step: int, total: int, peak: float, warmup: int = 0) -> float:
    """Linear warmup, then MiniMind's cosine from ``peak`` down to 0.1*peak: peak*(0.1 + 0.45*(1 + cos(pi*t/T)))."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def load_start_weights(model: nn.Module, from_weight: str, directory: str | None = None) -> None:
    """--from_weight: ``none``, a stage name (``pretrain`` -> <directory>/pretrain_<suffix>.pth) or a file path."""
    if from_weight.lower() == "none":
        return
    is_path = looks_like_path(from_weight)
    path = resolve_path(from_weight) if is_path else checkpoint_path(from_weight, model.config, directory)
    if not path.is_file():
        shape = model.config.describe().split(" (")[0]
        where = f" --out_dir {directory}" if directory else ""
        make = "" if is_path else f" It is written by: python trainer/train_{from_weight}.py {shape}{where}."
        raise FileNotFoundError(f"--from_weight {from_weight}: no checkpoint at {path}.{make} "
                                f"Or start from random weights with --from_weight none.")
    load_weights(model, path)


def build_model(stage: Stage, args: Namespace, tokenizer: Any, rt: Runtime) -> MiniMindForCausalLM:
    """The model a run starts from, the same on every rank: seeded, --from_weight loaded, on the device, then the
    stage's setup (freeze, add LoRA, copy a reference)."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    model = MiniMindForCausalLM(model_config(args, tokenizer))
    load_start_weights(model, args.from_weight, args.out_dir)
    model.to(rt.device)
    if stage.setup:
        stage.setup(model, args)
    return model


def epoch_loader(data: Dataset, args: Namespace, rt: Runtime, collate: Callable[[list[Batch]], Batch], epoch: int,
                 skip_rows: int) -> DataLoader:
    """This rank's batches of one epoch. The order is a function of (seed, epoch) only, so a resumed run skips
    exactly the rows it already trained on and then sees the same batches as an uninterrupted one."""
    sampler = DistributedSampler(data, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=args.seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    if isinstance(data, MixedRows):
        data.set_epoch(epoch)  # before the loader (and its workers) take the dataset: this epoch's draw
        step_rows = args.batch_size * args.accumulation_steps
        report_mix(data, order[:len(order) // step_rows * step_rows], epoch, rt)  # the rows of whole steps
    workers = args.num_workers if args.num_workers is not None else (0 if rt.device.type == "cpu" else 4)
    return DataLoader(data, batch_size=args.batch_size, sampler=order[skip_rows:], collate_fn=collate,
                      drop_last=True, num_workers=workers, pin_memory=rt.device.type == "cuda",
                      generator=torch.Generator())  # own generator: creating a loader leaves the global RNG alone


def report_mix(data: MixedRows, trained: list[int], epoch: int, rt: Runtime) -> None:
    """Print the share of the epoch's trained rows (all ranks) that come from the mix file: the asked one up to
    rounding and the partial step each epoch drops."""
    mixed, rows = all_ranks(rt, torch.tensor([data.mixed_in(trained), len(trained)], device=rt.device)).tolist()
    rt.print(f"[mix] epoch {epoch + 1}: {mixed} of {rows} rows ({mixed / max(rows, 1):.1%}) from --mix_data "
             f"(--mix_ratio {data.ratio:g})")


def step_batches(data: Dataset, args: Namespace, rt: Runtime, collate: Callable[[list[Batch]], Batch], start_step: int,
                 steps_per_epoch: int) -> Iterator[Iterator[Batch]]:
    """For each optimizer step from ``start_step`` on, its ``accumulation_steps`` micro-batches."""
    accum = args.accumulation_steps
    for epoch in range(start_step // steps_per_epoch, args.epochs):
        done = max(0, start_step - epoch * steps_per_epoch)
        batches = iter(epoch_loader(data, args, rt, collate, epoch, skip_rows=done * accum * args.batch_size))
        for _ in range(done, steps_per_epoch):
            yield itertools.islice(batches, accum)


def split_data(stage: Stage, args: Namespace, tokenizer: Any, rt: Runtime) -> tuple[Dataset, Dataset | None]:
    """The stage's rows as (train, held-out eval or None), checked for what would make a run pointless."""
    dataset = stage.build_dataset(args, tokenizer)
    mixed = dataset if isinstance(dataset, MixedRows) else None
    dataset = mixed.main if mixed else dataset  # the held-out rows come from the main file only
    if len(dataset) == 0:
        raise DataError(f"{getattr(args, 'data_path', None) or 'the dataset'} has no rows")
    if args.eval_size >= len(dataset):
        raise DataError(f"--eval_size {args.eval_size} leaves no rows to train on: the data has {len(dataset)}; "
                        f"lower it (0: no held-out eval)")
    train_set, eval_set = train_eval_split(dataset, eval_size=args.eval_size, seed=args.seed) if args.eval_size \
        else (dataset, None)
    if left_out := len(dataset) - len(train_set) - len(eval_set or []):
        rt.print(f"[data] {left_out} rows share a document with held-out rows: left out of training, so the eval "
                 f"loss is on unseen text")
    if not train_set:
        raise DataError(f"--eval_size {args.eval_size} leaves no rows to train on (with the {left_out} that share "
                        f"their documents); lower it (0: no held-out eval)")
    train_set = mixed.over(train_set) if mixed else train_set
    if rt.is_main:
        check_supervision(train_set, stage.collate, rt)
    return train_set, eval_set


def check_supervision(data: Dataset, collate: Callable[[list[Batch]], Batch], rt: Runtime, sample: int = 64) \
        -> None:
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

    global_batch: int  # rows per step: batch_size x accumulation_steps x GPUs
    steps_per_epoch: int  # each epoch drops its last partial step
    total: int


def plan_steps(train_rows: int, args: Namespace, rt: Runtime) -> Plan:
    global_batch = args.batch_size * args.accumulation_steps * rt.world_size
    steps_per_epoch = math.ceil(train_rows / rt.world_size) // args.batch_size // args.accumulation_steps
    if steps_per_epoch == 0:
        raise DataError(f"{train_rows} training rows make no step of {global_batch} rows (batch_size x "
                        f"accumulation_steps x GPUs): lower --batch_size, --accumulation_steps or --eval_size, or add "
                        f"data")
    total = args.epochs * steps_per_epoch
    return Plan(global_batch, steps_per_epoch, min(args.max_steps, total) if args.max_steps else total)


def all_ranks(rt: Runtime, value: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """``value`` summed (or ``op``) over all ranks, in place; as is in one process."""
    if rt.ddp:
        dist.all_reduce(value, op=op)
    return value


def all_agree(rt: Runtime, flag: bool) -> bool:
    """True when ``flag`` is true on any rank: every rank must stop together, or the others would wait forever at
    the next all-reduce."""
    return bool(all_ranks(rt, torch.tensor(float(flag), device=rt.device), dist.ReduceOp.MAX).item())


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
               window: Window, rt: Runtime) -> None:
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
        window.add_micro_batch(loss, metrics, shares[i], batch["input_ids"].numel())


def optimizer_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   grad_clip: float) -> torch.Tensor:
    """Clip (when ``grad_clip`` > 0), step, zero the gradients; returns the gradient norm before clipping. The norm is
    checked like the loss: a finite loss can still backpropagate inf, and AdamW would then write NaN weights."""
    scaler.unscale_(optimizer)  # a no-op without fp16
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else \
        nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def evaluate(model: nn.Module, stage: Stage, data: Dataset, args: Namespace, rt: Runtime) -> dict[str, float]:
    """Mean loss (and metrics) over the held-out rows, in order, on this rank: per ``stage.loss_weight`` (tokens,
    pairs), so the last, smaller batch counts by its size."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    total = 0.0
    for batch in DataLoader(data, batch_size=args.batch_size, collate_fn=stage.collate):
        weight = float(stage.loss_weight(batch))
        with rt.autocast():
            loss, metrics = stage.loss_fn(model, {k: v.to(rt.device) for k, v in batch.items()})
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * weight
        total += weight
    model.train()
    return {f"eval/{k}": v.item() / max(total, 1.0) for k, v in sums.items()}  # host sync, once per eval


class Window:
    """Loss and metric sums since the last log, kept on the device: adding to them costs no host sync."""

    def __init__(self, rt: Runtime):
        self.rt, self.tokens_total = rt, 0
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

    def read(self) -> tuple[dict[str, float], int | None]:
        """Means over the window and all ranks, tokens/s, and the first NaN/inf step (None if none); then reset."""
        names = list(self.sums)
        means = all_ranks(self.rt, torch.stack([self.sums[k] for k in names]) / self.steps) / self.rt.world_size
        first_bad = all_ranks(self.rt, self.first_bad.clone(), dist.ReduceOp.MIN).item()
        tokens = self.tokens * self.rt.world_size
        record = {k if k == "loss" else f"train/{k}": v for k, v in zip(names, means.tolist())}
        record["tokens_per_s"] = tokens / (time.time() - self.started)
        self.tokens_total += tokens
        self._reset()
        return record, (None if first_bad == float("inf") else int(first_bad))

    def went_bad(self) -> bool:
        """Whether a step of this window had a NaN/inf loss or gradient (a host sync: for when the run stops)."""
        return self.first_bad.item() != float("inf")

    def restart_clock(self) -> None:
        self.started = time.time()


def bad_row_error(bad_row: DataError, saved: str) -> DataError:
    """The error a bad data row ends a run with: the row's file:line, what was saved, and how to go on."""
    message = str(bad_row)
    if "Original Traceback" in message:  # a DataLoader worker's error arrives wrapped in its traceback
        message = message.rsplit("DataError: ", 1)[-1].strip()
    return DataError(f"{message}\nStopped ({saved}). Fix that line in place (deleting it would reshuffle the rows), "
                     f"or add --skip_bad_lines, then continue with --from_resume 1.")


def progress_text(record: dict[str, float]) -> str:
    """The bar's postfix: loss, lr, speed, then the stage's own metrics (e.g. DPO's reward margin and accuracy)."""
    text = f"loss {record['loss']:.3f} lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s"
    text += f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
    text += "".join(f" {k[6:]} {v:.3g}" for k, v in record.items() if k.startswith("train/"))
    return text + "".join(f" eval_{k[5:]} {v:.3g}" for k, v in record.items() if k.startswith("eval/"))


def rescaled_step(step: int, global_batch: int, steps_per_epoch: int | None, new_global_batch: int,
                  new_steps_per_epoch: int) -> int:
    """The step of a new global batch size at the same epoch and row of it (each epoch drops its own last partial
    step, so the rows before an epoch differ between batch sizes). Old resume files lack steps_per_epoch: then
    the step counts rows from the start."""
    epoch, into_epoch = divmod(step, steps_per_epoch) if steps_per_epoch else (0, step)
    return epoch * new_steps_per_epoch + into_epoch * global_batch // new_global_batch


# Settings that say where and how a run is watched, not what it computes. A change of any other setting on resume
# (a stage's own flags included) makes a different run from the one saved, and gets a note.
INCIDENTAL_SETTINGS = {"from_resume", "device", "use_compile", "compile_mode", "num_workers", "ddp", "local_rank",
                       "time_budget", "skip_bad_lines", "cache_dir", "out_dir", "save_interval", "save_hf",
                       "log_interval", "eval_interval", "use_wandb", "wandb_project", "peak_tflops"}


def restore(state: dict[str, Any], resume_file: Path, raw: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, args: Namespace, plan: Plan, rt: Runtime) -> tuple[int, str | None]:
    """Load a resume file's state; returns (step, logger run id). When the global batch changed (e.g. another GPU
    count), the step is the one at the same epoch and row of it, so no row is trained on twice or skipped."""
    saved = state.get("args", {})
    for name in sorted(saved.keys() & vars(args).keys() - INCIDENTAL_SETTINGS):
        if saved[name] != getattr(args, name):
            rt.print(f"[resume] note: --{name} was {saved[name]}, now {getattr(args, name)}")
    load_state_dict_into(raw, state["model"], resume_file)  # a model of other LoRA settings: a clear refusal
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    step = rescaled_step(state["step"], state["global_batch"], state.get("steps_per_epoch"), plan.global_batch,
                         plan.steps_per_epoch)
    if step != state["step"]:
        rt.print(f"[resume] global batch {state['global_batch']} -> {plan.global_batch} rows: step {state['step']} -> "
                 f"{step}")
    return step, state["run_id"]


# ----------------------------------------------------------------------------------------------------------------------
# the loop


def train(stage: Stage, args: Namespace) -> Result:
    """Train ``stage`` as ``args`` say. Returns on rank 0 and the others alike; the caller shuts DDP down."""
    rt = setup_runtime(args.device, args.dtype)
    tokenizer = load_tokenizer()
    raw = build_model(stage, args, tokenizer, rt)  # the plain module, for saving and eval; "model" may be wrapped
    config = raw.config
    weights_file = stage.weights_path(args, config)
    resume_file = resume_path(weights_file)
    # read (and refused, if it does not fit) before the data is tokenised, which may take minutes
    saved = load_resume(resume_file, stage.name, config) if args.from_resume else None
    train_set, eval_set = split_data(stage, args, tokenizer, rt)
    plan = plan_steps(len(train_set), args, rt)
    total = plan.total

    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, fused=rt.device.type == "cuda")
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)  # fp16 only: bf16 needs none
    step, run_id = 0, None
    if saved is not None:
        step, run_id = restore(saved, resume_file, raw, optimizer, scaler, args, plan, rt)
        del saved  # a CPU copy of the weights and the optimizer state: not for the whole run
        rt.print(f"[resume] {resume_file} at step {step}/{total}")
        if step >= total:
            rt.print(f"[resume] the run is already at step {step} of {total}: nothing to train. Raise --max_steps "
                     f"or --epochs to go on.")
            return Result(step, 0, 0.0, [])
    start_step = step

    model: nn.Module = torch.compile(raw, mode=args.compile_mode) if args.use_compile else raw
    if rt.ddp:  # MoE: a step may route no token to some expert, whose weights then get no gradient
        model = DistributedDataParallel(model, find_unused_parameters=config.use_moe)

    trainable = sum(p.numel() for p in params)
    rt.print(f"{stage.name}: {raw.params_summary()} ({config.describe()}), {trainable / 1e6:.2f}M trainable "
             f"({trainable / raw.count_parameters()[0]:.1%}), "
             f"device {rt.device} x{rt.world_size}, {str(rt.dtype).removeprefix('torch.')}")
    rt.print(f"{len(train_set)} train rows, {len(eval_set or [])} eval rows; {total} steps of {plan.global_batch} "
             f"rows ({plan.steps_per_epoch} per epoch); lr {args.learning_rate:g}; weights -> {weights_file}")
    logger = make_logger(args.use_wandb, rt.is_main, args.wandb_project, f"{stage.name}-{config.suffix}",
                         vars(args), run_id)
    peak = peak_tflops(rt.device, args.peak_tflops)  # TFLOP/s, None where unknown: then no MFU is shown
    history: list[dict[str, float]] = []
    batches = step_batches(train_set, args, rt, stage.collate, step, plan.steps_per_epoch)
    window = Window(rt)
    last_saved, start = None, time.time()

    def save() -> None:
        nonlocal last_saved
        if rt.is_main:
            stage.save_weights(raw, weights_file)
            save_resume(resume_file, stage=stage.name, shape=shape_of(config), tokenizer_vocab=config.tokenizer_vocab,
                        model=raw.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                        global_batch=plan.global_batch, steps_per_epoch=plan.steps_per_epoch,
                        world_size=rt.world_size, run_id=logger.run_id, args=vars(args))
        last_saved = step

    def stopped_by(bad_row: DataError) -> DataError:
        """Save the steps this run made since its last save, unless they went NaN or the run is DDP (the other ranks
        are mid-step, so only a single process can save)."""
        if rt.ddp or step in (start_step, last_saved) or window.went_bad():
            saved = f"last saved: step {last_saved}" if last_saved else "nothing saved by this run"
            return bad_row_error(bad_row, saved)
        save()
        return bad_row_error(bad_row, f"saved step {step}")

    with tqdm(total=total, initial=step, disable=not rt.is_main, dynamic_ncols=True) as bar:
        while step < total:
            lr = lr_at(step, total, args.learning_rate, args.warmup_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                micro_batches = list(next(batches))
            except DataError as e:
                raise stopped_by(e) from None
            accumulate(model, stage, micro_batches, scaler, window, rt)
            grad_norm = optimizer_step(params, optimizer, scaler, args.grad_clip)
            window.end_step(step, None if scaler.is_enabled() else grad_norm)
            step += 1
            bar.update()

            save_due = step == total or (args.save_interval and step % args.save_interval == 0)
            if not save_due and not (args.log_interval and step % args.log_interval == 0):
                continue
            record, first_bad = window.read()  # host sync, once per log interval
            if first_bad is not None:
                where = f"{resume_file} (step {last_saved})" if last_saved else \
                    f"{resume_file} (from an earlier run)" if resume_file.exists() else "none, nothing was saved"
                raise TrainingDiverged(f"loss or gradient is NaN/inf at step {first_bad + 1}; stopped without "
                                       f"saving. Last good checkpoint: {where}. Lower --learning_rate, try --dtype "
                                       f"bfloat16 or float32, or check the data.")
            out_of_time = all_agree(rt, bool(args.time_budget) and time.time() - start > args.time_budget)
            record.update(step=step, lr=lr)
            if peak:
                record["mfu"] = record["tokens_per_s"] * flops_per_token(config, args.max_seq_len) / (peak * 1e12)
            eval_due = step == total or out_of_time or (args.eval_interval and step % args.eval_interval == 0)
            if eval_set is not None and rt.is_main and eval_due:
                try:
                    record.update(evaluate(raw, stage, eval_set, args, rt))
                except DataError as e:  # a bad held-out row: the steps since the last save are good
                    raise stopped_by(e) from None
            history.append(record)
            logger.log(record, step)
            bar.set_postfix_str(progress_text(record))
            if save_due:
                save()
            window.restart_clock()  # the next window's speed leaves out this eval and save
            if out_of_time:
                break
    if step < total:  # after the bar has closed, so the line stands on its own
        rt.print(f"[time] --time_budget {args.time_budget:g}s reached at step {step}/{total}")
    if last_saved != step:
        save()
    logger.finish()
    result = Result(step, window.tokens_total, time.time() - start, history)
    final = history[-1] if history else {}
    rt.print(f"done: {step} steps, {result.tokens:,} tokens, {result.seconds / 60:.1f} min; "
             f"train loss {final.get('loss', float('nan')):.3f}"
             + (f", eval loss {final['eval/loss']:.3f}" if "eval/loss" in final else "") + f"; saved {weights_file}")
    if args.save_hf and rt.is_main:
        # a stock Llama/Qwen3 folder (MoE: ours) with eos set, loadable without this repo and by llama.cpp
        folder = save_transformers(raw, tokenizer, out_dir(args.out_dir) / f"{weights_file.stem}-hf")
        rt.print(f"transformers folder: {folder}")
    return result


def run(stage: Stage, args: Namespace) -> None:
    """A stage script's whole main: train, then leave DDP cleanly. A diverged run, bad data, a missing file or a
    checkpoint that does not fit exits 1 with its message alone (it says what to do; a traceback would bury it)."""
    try:
        train(stage, args)
    except TrainingDiverged as e:
        print(f"\n[stopped] {e}", file=sys.stderr, flush=True)
        shutdown(1)
    except (DataError, FileNotFoundError, CheckpointMismatch, SaveError) as e:
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        shutdown(1)
    shutdown(0)
