"""A run's checkpoint: the weights file (what inference loads) and the resume file beside it (everything needed to
continue the run exactly), both written atomically; and restoring a run from its resume file."""

from __future__ import annotations

import random
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dataset import DataError
from model.model_minimind import SHAPE_FIELDS, MiniMindConfig
from model.files import atomic_save, config_path, remove_stale_temps
from model.weights import CheckpointMismatch, check_vocabulary, load_state_dict_into
from trainer.data import Plan
from trainer.runtime import Runtime


def resume_path(weights_path: Path) -> Path:
    """``out/pretrain_512.pth`` -> ``out/pretrain_512_resume.pth``."""
    return weights_path.with_name(f"{weights_path.stem}_resume.pth")


def shape_of(config: MiniMindConfig) -> dict[str, Any]:
    """The config fields that decide whether saved tensors fit (not generation or bookkeeping fields)."""
    return {k: getattr(config, k) for k in ("vocab_size", *SHAPE_FIELDS)}


def rng_state() -> dict[str, Any]:
    # numpy's state as plain lists: the file then loads with weights_only=True (no pickled objects)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume(path: Path, **state: Any) -> None:
    atomic_save({**state, "rng": rng_state()}, path)


def load_resume(path: Path, stage: str, config: MiniMindConfig) -> dict[str, Any]:
    """The resume file of this stage and shape, or a clear refusal naming what the file holds instead."""
    if not path.is_file():
        raise FileNotFoundError(f"--from_resume 1: no resume file at {path}. Start the run without --from_resume "
                                f"(one is written every --save_interval steps).")
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: no pickled code
    if state["stage"] != stage or state["shape"] != shape_of(config):
        held = MiniMindConfig(**state["shape"]).describe()
        raise CheckpointMismatch(f"{path} holds a '{state['stage']}' run of a model with {held};\nthis is a "
                                 f"'{stage}' run of {config.describe()}. Pass the flags that match the file, or drop "
                                 f"--from_resume.")
    check_vocabulary(state.get("tokenizer_vocab"), config.tokenizer_vocab, path,
                     "the trainers read the tokenizer in model/: resume with the one the run was started with")
    return state


def file_stamp(path: Path) -> dict[str, int] | None:
    """What tells one write of a file from another: its size and modification time (None: no file)."""
    if not path.is_file():
        return None
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


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
                       "log_interval", "eval_interval", "use_wandb", "wandb_project", "peak_tflops",
                       "teacher_device", "reward_device"}


def bad_row_error(bad_row: DataError, saved: str) -> DataError:
    """The error a bad data row ends a run with: the row's file:line, what was saved, and how to go on."""
    message = str(bad_row)
    if "Original Traceback" in message:  # a DataLoader worker's error arrives wrapped in its traceback
        message = message.rsplit("DataError: ", 1)[-1].strip()
    return DataError(f"{message}\nStopped ({saved}). Fix that line in place (deleting it would reshuffle the rows), "
                     f"or add --skip_bad_lines, then continue with --from_resume 1.")


class Checkpointer:
    """Saves a run's weights file and resume file together (rank 0 writes, every rank keeps count), restores a run
    from its resume file, and remembers the last step saved, for the messages of a run that stops early."""

    def __init__(self, stage: str, save_weights: Callable[[nn.Module, Path], Any], weights_file: Path,
                 model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, plan: Plan,
                 args: Namespace, rt: Runtime):
        self.stage, self.save_weights, self.weights_file = stage, save_weights, weights_file
        self.resume_file = resume_path(weights_file)
        self.model, self.optimizer, self.scaler, self.plan = model, optimizer, scaler, plan
        self.args, self.rt = args, rt
        self.run_id: str | None = None  # the logger's run: a resumed run logs on to it
        self.start_step = 0  # where this run started: 0, or the step it resumed at
        self.last_saved: int | None = None  # by this run

    def restore(self, state: dict[str, Any]) -> int:
        """Load a resume file's state (read by ``load_resume``); returns the step to go on from. When the global
        batch changed (e.g. another GPU count), that is the step at the same epoch and row of it, so no row is trained
        on twice or skipped."""
        saved, args = state.get("args", {}), vars(self.args)
        for name in sorted(saved.keys() & args.keys() - INCIDENTAL_SETTINGS):
            if saved[name] != args[name]:
                self.rt.print(f"[resume] note: --{name} was {saved[name]}, now {args[name]}")
        load_state_dict_into(self.model, state["model"], self.resume_file)  # other LoRA settings: a clear refusal
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step = rescaled_step(state["step"], state["global_batch"], state.get("steps_per_epoch"),
                             self.plan.global_batch, self.plan.steps_per_epoch)
        if step != state["step"]:
            self.rt.print(f"[resume] global batch {state['global_batch']} -> {self.plan.global_batch} rows: step "
                          f"{state['step']} -> {step}")
        self.start_step, self.run_id = step, state["run_id"]
        if "weights_stamp" in state and file_stamp(self.weights_file) != state["weights_stamp"]:
            self.rt.print(f"[resume] {self.weights_file} is not the file saved with {self.resume_file} (a save cut "
                          f"short, or the file was replaced): both are written again, at step {step}")
            self.save(step)
        return step

    def save(self, step: int) -> None:
        """The weights file, then the resume file, each written atomically (temp file + rename), on rank 0. The resume
        file records which weights file it goes with: a kill between the two writes leaves a newer weights file than
        resume file, and ``restore`` then makes them agree again."""
        if self.rt.is_main:
            for target in (self.weights_file, config_path(self.weights_file), self.resume_file):
                remove_stale_temps(target)  # a process killed mid-save leaves its temp file
            config = self.model.config
            self.save_weights(self.model, self.weights_file)
            save_resume(self.resume_file, stage=self.stage, shape=shape_of(config),
                        tokenizer_vocab=config.tokenizer_vocab, model=self.model.state_dict(),
                        optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), step=step,
                        global_batch=self.plan.global_batch, steps_per_epoch=self.plan.steps_per_epoch,
                        world_size=self.rt.world_size, run_id=self.run_id, args=vars(self.args),
                        weights_stamp=file_stamp(self.weights_file))
        self.last_saved = step

    def last_good(self) -> str:
        """Where the last good checkpoint is, for a run that stops on a NaN without saving."""
        if self.last_saved:
            return f"{self.resume_file} (step {self.last_saved})"
        return f"{self.resume_file} (from an earlier run)" if self.resume_file.exists() else "none, nothing was saved"

    def stop_on_bad_row(self, bad_row: DataError, step: int, went_bad: bool) -> DataError:
        """The error that ends a run at a bad data row, after saving the steps made since the last save, unless they
        went NaN (``went_bad``) or the run is DDP (the other ranks are mid-step, so only a single process can save)."""
        if self.rt.ddp or step in (self.start_step, self.last_saved) or went_bad:
            return bad_row_error(bad_row, f"last saved: step {self.last_saved}" if self.last_saved
                                 else "nothing saved by this run")
        self.save(step)
        return bad_row_error(bad_row, f"saved step {step}")
