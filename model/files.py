"""Where the repo's files live and how they are written: the repo-root paths, MiniMind's checkpoint names, and the
atomic write every checkpoint, config and adapter goes through (a crash mid-write never leaves a broken file)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

if TYPE_CHECKING:
    from model.model_minimind import MiniMindConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "out"
TOKENIZER_DIR = REPO_ROOT / "model"


def resolve_path(path: str | os.PathLike) -> Path:
    """A user-given path: absolute as is; relative to the current directory if it exists there, else to the repo
    root. So ``out/pretrain_512.pth`` means the same file whether a script runs from the repo root or from trainer/."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    return REPO_ROOT / path


def out_dir(path: str | os.PathLike | None = None) -> Path:
    """Where checkpoints go: ``out/`` under the repo root by default; a typed --out_dir as ``resolve_path`` finds it
    (the current directory's folder if there is one, else the repo root's)."""
    return resolve_path(path) if path else OUT_DIR


def checkpoint_path(stage: str, config: MiniMindConfig, directory: str | os.PathLike | None = None) -> Path:
    """MiniMind's naming: ``out/<stage>_<hidden>[_moe].pth``, e.g. ``out/full_sft_512.pth``."""
    return out_dir(directory) / f"{stage}_{config.suffix}.pth"


def config_path(weights: str | os.PathLike) -> Path:
    """The config file that ``save_weights`` writes beside a weights file (``full_sft_512.pth`` -> ``.json``)."""
    return Path(weights).with_suffix(".json")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file beside ``path``, then rename: a crash mid-write never leaves a broken file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` into a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint should read like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
