"""The one training loop every stage shares.

A stage (pretrain, full SFT, LoRA, DPO, distillation) is a ``Stage`` (trainer/stage.py): its name, its dataset, its
loss as a function of model and batch, and optional hooks. Everything else happens once, here, and ``train`` reads
top to bottom: set up, then per step the LR, the micro-batches, forward/backward, the optimizer step, and every
--log_interval steps one ``log_point`` (NaN guard, eval, log, save). The pieces it calls live beside it:

    trainer/data.py        split, plan, and the batch order a resumed run picks up at any step
    trainer/step.py        one optimizer step, the held-out eval, the numbers a run reports
    trainer/checkpoint.py  the weights + resume files, and restoring a run from them
    trainer/runtime.py     device, dtype, DDP

    stage = Stage("pretrain", build_dataset=lambda args, tok: PretrainDataset(...))
    run(stage, args)
"""

from __future__ import annotations

import functools
import math
import random
import time
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dataset import DataError
from model import MiniMindForCausalLM
from model.files import checkpoint_path, out_dir, resolve_path
from model.flops import flops_per_token, peak_tflops
from model.hf_interop import save_transformers
from model.loading import load_tokenizer, looks_like_path, make_it_with
from model.weights import load_weights
from trainer.args import model_config
from trainer.checkpoint import Checkpointer, load_resume, resume_path
from trainer.data import plan_steps, split_data, step_batches
from trainer.logger import make_logger
from trainer.runtime import CtrlC, Runtime, any_rank, setup_runtime
from trainer.stage import Stage
from trainer.step import Progress, accumulate, evaluate, optimizer_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; nothing was saved after it."""


@dataclass
class Result:
    steps: int
    tokens: int
    seconds: float
    history: list[dict[str, float]]  # one record per logged step: step, loss, lr, tokens_per_s, train/*, eval/*
    stopped: str | None = None  # why the run ended before its last step: "interrupt" (Ctrl-C) or "time_budget"


def lr_at(step: int, total: int, peak: float, warmup: int = 0) -> float:
    """Linear warmup, then MiniMind's cosine from ``peak`` down to 0.1*peak: peak*(0.1 + 0.45*(1 + cos(pi*t/T)))."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def every(step: int, interval: int) -> bool:
    """Whether ``step`` is one of every ``interval`` steps (interval 0: none)."""
    return bool(interval) and step % interval == 0


def load_start_weights(model: nn.Module, from_weight: str, directory: str | None = None) -> None:
    """--from_weight: ``none``, a stage name (``pretrain`` -> <directory>/pretrain_<suffix>.pth) or a file path."""
    if from_weight.lower() == "none":
        return
    is_path = looks_like_path(from_weight)
    path = resolve_path(from_weight) if is_path else checkpoint_path(from_weight, model.config, directory)
    if not path.is_file():
        message = f"--from_weight {from_weight}: no checkpoint at {path}."
        if not is_path and (make := make_it_with(from_weight, model.config, directory)):
            message += f" {make}"  # on this line, so the command is the rest of it
        raise FileNotFoundError(f"{message}\nOr start from random weights with --from_weight none.")
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


def train(stage: Stage, args: Namespace) -> Result:
    """Train ``stage`` as ``args`` say. Returns on rank 0 and the others alike; the caller shuts DDP down."""
    deadline = time.time() + args.time_budget if args.time_budget else math.inf  # set-up counts too
    rt = setup_runtime(args.device, args.dtype)
    tokenizer = load_tokenizer()
    raw = build_model(stage, args, tokenizer, rt)  # the plain module, for saving and eval; "model" may be wrapped
    config = raw.config
    weights_file = stage.weights_path(args, config)
    # read (and refused, if it does not fit) before the data is tokenised, which may take minutes
    saved = load_resume(resume_path(weights_file), stage.name, config) if args.from_resume else None
    train_set, eval_set = split_data(stage.build_dataset(args, tokenizer), args.eval_size, args.seed, stage.collate, rt,
                                     source=getattr(args, "data_path", None) or "the dataset")
    plan = plan_steps(len(train_set), args.batch_size, args.accumulation_steps, rt.world_size, args.epochs,
                      args.max_steps)

    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(stage.param_groups(raw) if stage.param_groups else params, lr=args.learning_rate,
                                  fused=rt.device.type == "cuda")
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)  # fp16 only: bf16 needs none
    checkpoints = Checkpointer(stage.name, stage.save_weights, weights_file, raw, optimizer, scaler, plan, args, rt)
    step = 0
    if saved is not None:
        step = checkpoints.restore(saved)
        del saved  # a CPU copy of the weights and the optimizer state: not for the whole run
        rt.print(f"[resume] {checkpoints.resume_file} at step {step}/{plan.total}")
        if step >= plan.total:
            rt.print(f"[resume] the run is already at step {step} of {plan.total}: nothing to train. Raise "
                     f"--max_steps or --epochs to go on.")
            return Result(step, 0, 0.0, [])

    model: nn.Module = torch.compile(raw, mode=args.compile_mode) if args.use_compile else raw
    if rt.ddp:  # MoE: a step may route no token to some expert, whose weights then get no gradient
        model = DistributedDataParallel(model, find_unused_parameters=config.use_moe)
    trainable = sum(p.numel() for p in params)
    rt.print(f"{stage.name}: {raw.params_summary()} ({config.describe()}), {trainable / 1e6:.2f}M trainable "
             f"({trainable / raw.count_parameters()[0]:.1%}), "
             f"device {rt.device} x{rt.world_size}, {str(rt.dtype).removeprefix('torch.')}")
    budget = f", at most {args.time_budget:g}s (--time_budget)" if args.time_budget else ""
    rt.print(f"{len(train_set)} train rows, {len(eval_set or [])} eval rows; {plan.describe()}{budget}; "
             f"lr {args.learning_rate:g}; weights -> {weights_file}")
    logger = make_logger(args.use_wandb, rt.is_main, args.wandb_project, f"{stage.name}-{config.suffix}",
                         vars(args), checkpoints.run_id)
    checkpoints.run_id = logger.run_id
    peak = peak_tflops(rt.device, args.peak_tflops)  # TFLOP/s, None where unknown: then no MFU is shown
    mfu_per_token_per_s = flops_per_token(config, args.max_seq_len) / (peak * 1e12) if peak else None
    run_eval = functools.partial(evaluate, raw, stage, eval_set, args.batch_size, rt) \
        if eval_set is not None and rt.is_main else None
    batches = step_batches(train_set, plan, step, stage.collate, args.seed, args.num_workers, rt)
    start = time.time()

    with tqdm(total=plan.total, initial=step, disable=not rt.is_main, dynamic_ncols=True) as bar, \
            CtrlC(announce=rt.is_main) as ctrl_c:
        progress = Progress(rt, bar, logger, mfu_per_token_per_s)
        while step < plan.total:
            lr = lr_at(step, plan.total, args.learning_rate, args.warmup_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            try:
                micro_batches = list(next(batches))
            except DataError as e:
                raise checkpoints.stop_on_bad_row(e, step, progress.went_bad()) from None
            for step_batch in stage.rollout(model, micro_batches, step, rt) if stage.rollout else [micro_batches]:
                accumulate(model, stage, step_batch, scaler, progress, rt)
                grad_norm = optimizer_step(params, optimizer, scaler, args.grad_clip)
                progress.end_step(step, None if scaler.is_enabled() else grad_norm)
            step += 1
            bar.update()

            # checked every step (a host clock read; under DDP one tiny host all-reduce), so all ranks stop together
            interrupted, out_of_time = any_rank(rt, ctrl_c.pressed, time.time() > deadline)
            stopping = interrupted or out_of_time
            save_due = step == plan.total or stopping or every(step, args.save_interval)
            if save_due or every(step, args.log_interval):
                eval_due = step == plan.total or stopping or every(step, args.eval_interval)
                log_point(step, lr, progress, checkpoints, run_eval if eval_due else None, save_due)
            if stopping:
                break
    stopped = None if step == plan.total else "interrupt" if interrupted else "time_budget"
    if stopped:  # after the bar has closed, so the line stands on its own
        why = "[interrupt] Ctrl-C" if interrupted else f"[time] --time_budget {args.time_budget:g}s reached"
        rt.print(f"{why} at step {step}/{plan.total}; saved step {step}")
    logger.finish()
    result = Result(step, progress.tokens_total, time.time() - start, progress.history, stopped)
    final = result.history[-1] if result.history else {}
    evals = [f"{k.removeprefix('eval/')} {v:#.4g}" for k, v in final.items() if k.startswith("eval/")]
    rt.print(f"done: {step} steps, {result.tokens:,} tokens, {result.seconds / 60:.1f} min; "
             f"train loss {final.get('loss', float('nan')):.3f}" + (f"; eval {', '.join(evals)}" if evals else "")
             + f"; saved {weights_file}")
    if args.save_hf and rt.is_main:
        # a stock Llama/Qwen3 folder (MoE: ours) with eos set, loadable without this repo and by llama.cpp
        folder = save_transformers(raw, tokenizer, out_dir(args.out_dir) / f"{weights_file.stem}-hf")
        rt.print(f"transformers folder: {folder}")
    return result


def log_point(step: int, lr: float, progress: Progress, checkpoints: Checkpointer,
              run_eval: Callable[[], dict[str, float]] | None, save: bool) -> None:
    """Every --log_interval steps, at saves and at the end: the numbers since the last log point (a host sync), the
    NaN guard, the held-out eval (``run_eval``, when due), the log, and the save (when due)."""
    record, first_bad = progress.read(step, lr)
    if first_bad is not None:
        raise TrainingDiverged(f"loss or gradient is NaN/inf at step {first_bad + 1}; stopped without saving. Last "
                               f"good checkpoint: {checkpoints.last_good()}. Lower --learning_rate, try --dtype "
                               f"bfloat16 or float32, or check the data.")
    if run_eval is not None:
        try:
            record.update(run_eval())
        except DataError as e:  # a bad held-out row: the steps since the last save are good
            raise checkpoints.stop_on_bad_row(e, step, went_bad=False) from None
    progress.log(record)
    if save:
        checkpoints.save(step)
    progress.restart_clock()  # the next window's speed leaves out this eval and save
