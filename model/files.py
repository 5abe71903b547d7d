"""Where the repo's files live and how they are written: the repo-root paths, MiniMind's checkpoint names, and the
atomic write every checkpoint, config and adapter goes through (a crash mid-write never leaves a broken file)."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import secrets
import shutil
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


class SaveError(OSError):
    """A file that could not be written (the disk is full, no permission); the file that was there is intact."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file beside ``path``, then rename: a crash mid-write never leaves a broken file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` into a temp file beside ``path``, then rename it into place. A crash mid-write leaves the
    previous file as it was (and at worst a temp file, which ``remove_stale_temps`` clears); a full disk or another
    OSError is a ``SaveError`` naming the path. The file gets the permissions a plain write gives it: the umask's for
    a new file, its own for one written over."""
    path = Path(path)
    existed = path.exists()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # the name remove_stale_temps looks for
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:  # created as any new file is: mode 0o666 less the umask
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if existed:
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        message = _save_failure(e, path, "the previous file is intact" if existed else "nothing was written")
        if message is None:
            raise
        raise SaveError(message) from e


def _save_failure(error: BaseException, path: Path, kept: str) -> str | None:
    """A SaveError's message for an error raised while writing ``path``; None for other errors (Ctrl-C, a bug in the
    caller's ``write``), which go on as they are."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)  # torch.save's RuntimeError carries the OSError of the failed write as its context
    if any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e) for e in chain):
        return f"No space left on the device to save {path}; {kept}. Free some space, then save again"
    if isinstance(error, OSError):
        return f"could not save {path} ({error.strerror or error}); {kept}"
    if isinstance(error, RuntimeError) and ("inline_container" in str(error) or "PytorchStreamWriter" in str(error)):
        reason = str(error).splitlines()[0]
        return f"could not save {path}: torch's writer failed ({reason}), most often for lack of disk space; {kept}"
    return None


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Delete the temp files that writes of ``target`` left behind when their process was killed mid-write; returns
    them. Only for a target no other process is writing now (their temp files look the same)."""
    target = Path(target)
    # atomic_write's temp names, .<name>.<random>.tmp (earlier versions' mkstemp names too): the random part has no
    # dots, so the temp files of another target (pretrain_512.pth.bak, say) never match
    pattern = re.compile(re.escape(f".{target.name}.") + r"[a-z0-9_]+\.tmp")
    stale = [p for p in target.parent.glob(f".{glob.escape(target.name)}.*.tmp")
             if pattern.fullmatch(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
