"""Resume files: everything needed to continue a run exactly, written atomically beside the weights file."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.model_minimind import SHAPE_FIELDS, MiniMindConfig
from model.files import atomic_save
from model.weights import CheckpointMismatch, check_vocabulary


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
