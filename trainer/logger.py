"""Experiment logging: swanlab when asked for, else a logger that does nothing, so the loop never asks which."""

from __future__ import annotations

import os
import warnings
from typing import Any

from model.files import REPO_ROOT


class NullLogger:
    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class SwanlabLogger(NullLogger):
    """swanlab, where any failure warns once and turns logging off instead of stopping training."""

    def __init__(self, project: str, name: str, config: dict[str, Any], run_id: str | None = None,
                 log_dir: str | os.PathLike | None = None):
        import swanlab

        log_dir = log_dir or os.environ.get("SWANLAB_LOG_DIR") or REPO_ROOT / "swanlog"

        self._swanlab = swanlab
        mode = os.environ.get("SWANLAB_MODE")
        if mode is None and not swanlab.Settings().api_key:  # not logged in: keep the run on disk, sync it later
            mode = "offline"
            print(f"swanlab: not logged in, logging offline to {log_dir} (`swanlab login`, then `swanlab sync`)")
        self._run = self._safely(swanlab.init, project=project, name=name, config=config, mode=mode,
                                 log_dir=str(log_dir),
                                 id=run_id, resume="allow" if run_id else None)
        self.run_id = getattr(self._run, "id", None) if self._run is not None else None

    def _safely(self, fn, *args, **kwargs):
        if getattr(self, "_broken", False):
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # a logging failure must never cost a training run
            self._broken = True
            warnings.warn(f"swanlab failed ({type(e).__name__}: {e}); training goes on without it", stacklevel=3)
            return None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._safely(self._swanlab.log, metrics, step=step)

    def finish(self) -> None:
        self._safely(self._swanlab.finish)


def make_logger(enabled: bool, is_main: bool, project: str, name: str, config: dict[str, Any],
                run_id: str | None = None) -> NullLogger:
    """Rank 0 logs; the other ranks and runs without --use_wandb get the no-op logger."""
    if not (enabled and is_main):
        return NullLogger()
    return SwanlabLogger(project, name, config, run_id)
