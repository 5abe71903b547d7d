"""Where training runs: device, autocast dtype and torchrun DDP, set up once and torn down cleanly; and Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.devices import best_device, resolve_dtype


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    host_group: Any = None  # DDP: the gloo group for host-side flags (None: the default group, when that is gloo)

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def print(self, *args, **kwargs) -> None:
        """print on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)


def setup_runtime(device: str | None = None, dtype: str = "auto") -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and pick device and dtype."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(device or best_device())
    if dev.type == "cuda" and (world > 1 or dev.index is None):  # set_device needs an index: "cuda" -> "cuda:0"
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+: ~free speed for fp32 parts
        torch.backends.cudnn.allow_tf32 = True
    host_group = None
    if world > 1:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":  # host flags all-reduced over nccl would need a GPU copy and a sync each step
            host_group = dist.new_group(backend="gloo")
    return Runtime(dev, resolve_dtype(dev, dtype, training=True), rank, local_rank, world, host_group)


def all_ranks(rt: Runtime, value: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """``value`` summed (or ``op``) over all ranks, in place; as is in one process."""
    if rt.ddp:
        dist.all_reduce(value, op=op)
    return value


def any_rank(rt: Runtime, *flags: bool) -> list[bool]:
    """Each flag: whether it is true on any rank. Every rank must stop together, or the others would wait forever at
    the next all-reduce. Under DDP one small all-reduce on the host (a gloo group): cheap enough for every step, and
    no GPU sync."""
    if not rt.ddp:
        return list(flags)
    values = torch.tensor(flags, dtype=torch.float32)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=rt.host_group)
    return [bool(v) for v in values.tolist()]


class CtrlC:
    """Ctrl-C (SIGINT) during training, as a request: the first one sets ``pressed`` (the loop then finishes its step,
    saves and stops); a second one aborts at once (KeyboardInterrupt). Outside this block, off the main thread
    (where Python cannot handle signals), and where SIGINT is ignored (a shell's background job), Ctrl-C keeps its
    usual meaning."""

    def __init__(self, announce: bool):
        self.pressed, self.announce, self._previous = False, announce, None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        if self.announce:
            print("\n[interrupt] Ctrl-C: stopping after this step, then saving (Ctrl-C again aborts at once)",
                  file=sys.stderr, flush=True)


def ignore_ctrl_c(worker_id: int) -> None:
    """A data loader worker's start: Ctrl-C is the main process's to handle (it reaches the whole process group, and
    a worker that quit on it would break the step being finished)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shutdown(code: int = 0) -> None:
    """Leave the process group (if any) and exit with ``code``. gloo sometimes aborts (SIGABRT) in interpreter
    teardown after destroy_process_group, so a gloo process ends with os._exit once its output is flushed."""
    if dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.destroy_process_group()
        if gloo:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if code:
        sys.exit(code)
