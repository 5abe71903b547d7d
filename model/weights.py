"""Weights files: save a model's state dict, read one back, and load it strictly into a model, refusing a file of
another shape or vocabulary with one message that names each mismatch and the config the file needs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.checkpoint_config import describe_checkpoint, head_is_tied
from model.files import atomic_save, atomic_write, config_path, resolve_path
from model.model_minimind import MiniMindConfig


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model it is loaded into, or is no checkpoint at all (empty, truncated,
    something else); the message says what is wrong and what the file needs."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers: the one whose state-dict names
    are the plain ones a checkpoint holds."""
    while True:
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def unwrapped_name(key: str) -> str:
    """A state-dict name as the bare model has it (DDP's ``module.`` and torch.compile's ``_orig_mod.`` removed)."""
    return key.removeprefix("module.").removeprefix("_orig_mod.")


def save_weights(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """A plain state dict in MiniMind's layout (half precision by default), written atomically, with the model's
    config beside it (``full_sft_512.pth`` -> ``full_sft_512.json``): the tensors tell the shape, but not what
    ``load_model`` would otherwise have to guess from a preset (MoE top-k, RMSNorm eps, aux-loss alpha)."""
    model = unwrap_model(model)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}
    config = getattr(model, "config", None)
    if isinstance(config, MiniMindConfig):
        atomic_write(config_path(path), lambda f: f.write(config.to_json_string(use_diff=False).encode()))
    atomic_save(state, path)
    return Path(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.pth`` (loaded with ``weights_only=True``: no pickled code runs) or ``.safetensors`` file;
    a file that is neither, or holds no dict of tensors, is a CheckpointMismatch saying what it is instead."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise CheckpointMismatch(f"{path} {_unreadable(path, e, 'safetensors')}") from None
    state = read_torch_file(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a resume file: the weights are one entry of it
    if not isinstance(state, dict):
        raise CheckpointMismatch(f"{path} holds a {type(state).__name__}, not a state dict (a dict of named tensors)")
    return {unwrapped_name(k): v for k, v in state.items()}


def read_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file it cannot read is a CheckpointMismatch saying why
    (empty, truncated, pickled objects, not a PyTorch file at all) rather than torch's error of the moment."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as e:  # each seen for a bad file
        raise CheckpointMismatch(f"{path} {_unreadable(path, e, 'PyTorch')}") from None


def _unreadable(path: Path, error: Exception, kind: str) -> str:
    """Why ``path`` does not load as a ``kind`` (PyTorch or safetensors) file, told by its first bytes."""
    with path.open("rb") as f:
        head = f.read(64)
    if not head:
        return "is empty (0 bytes): a save or download that was cut off"
    # torch.save writes a zip archive (a pickle in its legacy format); safetensors, 8 bytes of size, then JSON
    if not (head.startswith((b"PK\x03\x04", b"\x80")) if kind == "PyTorch" else head[8:9] == b"{"):
        text = head.decode().strip().splitlines()[0] if head.isascii() and head.strip() else None
        return f"is not a {kind} checkpoint" + (f" (it is text: {text!r})" if text else "")
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]  # torch's first sentence
    if "Weights only load failed" in reason:  # a pickle of more than tensors
        return ("holds pickled Python objects (e.g. a whole model saved with torch.save(model)); only a state dict "
                "loads: save model.state_dict() instead")
    return f"is truncated or damaged ({kind} could not read it: {reason})"


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint strictly into ``model`` (fp16/bf16/fp32 are cast to the model's dtype).

    A file of another shape fails with one message naming each mismatched parameter, both shapes, and the config
    the file needs, never a silent ``strict=False``; so does one whose ``.json`` records another vocabulary than
    ``model.config.tokenizer_vocab``. Tied ``lm_head.weight`` may be absent from the file.
    """
    check_vocabulary(trained_vocabulary(path), getattr(getattr(model, "config", None), "tokenizer_vocab", None), path,
                     "the trainers read the tokenizer in model/: train with the one the file was made with")
    return load_state_dict_into(model, read_state_dict(path), path)


def vocab_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's token -> id map. Embedding row i means token i only under the vocabulary a
    model was trained with, so the trainers record this (``config.tokenizer_vocab``) and loading checks it."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def trained_vocabulary(weights: str | os.PathLike) -> str | None:
    """The vocabulary recorded in the config beside a weights file (None: not recorded, e.g. MiniMind's files)."""
    try:
        return json.loads(config_path(resolve_path(weights)).read_text()).get("tokenizer_vocab")
    except (OSError, ValueError, AttributeError):
        return None


def check_vocabulary(trained: str | None, given: str | None, source: str | os.PathLike, fix: str) -> None:
    """Refuse weights trained under another vocabulary than the tokenizer in use (its ids would mean other
    tokens: fluent-looking gibberish). Either side unknown: nothing to check."""
    if trained and given and trained != given:
        raise CheckpointMismatch(f"{source} was trained with another tokenizer (vocabulary {trained}; this one is "
                                 f"{given}); {fix}")


def load_state_dict_into(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> nn.Module:
    """``load_weights`` for tensors already in memory (e.g. read from a transformers folder); ``source`` names them.
    ``state`` itself is left as it was."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and not head_is_tied(state):
        raise CheckpointMismatch(f"checkpoint {source} has an lm_head.weight of its own (untied embeddings), but this "
                                 "model ties its head to the embedding. load_model (eval_llm.py, the server, "
                                 "convert_model.py) reads this off the file; in code, build the model with "
                                 "tie_word_embeddings=False")
    state = dict(state)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    for key, tied_to in tied.items():  # checkpoints may store the tied head or omit it
        if key not in state and tied_to in state:
            state[key] = state[tied_to]
    report = _mismatch_report(model, state, source)
    if report:
        raise CheckpointMismatch(report)
    model.load_state_dict(state, strict=True)
    return model


def _mismatch_report(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> str | None:
    """What keeps ``state`` out of ``model`` (other shapes, missing or extra tensors) and what the file needs; None
    when it fits."""
    own = model.state_dict()
    shape_mismatches = [f"  {k}: file has {tuple(v.shape)}, model has {tuple(own[k].shape)}"
                        for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if not (shape_mismatches or missing or unexpected):
        return None
    lines = [f"checkpoint {source} does not fit this model ({describe_model(model)})."]
    lines += ["Shape mismatches:", *short_lines(shape_mismatches)] if shape_mismatches else []
    lines += [f"Missing from the file: {short_list(missing)}"] if missing else []
    lines += [f"Not in the model: {short_list(unexpected)}"] if unexpected else []
    lines.append(f"The file needs: {describe_checkpoint(state, source)}")
    return "\n".join(lines)


def short_list(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def short_lines(lines: list[str], limit: int = 8) -> list[str]:
    """The first ``limit`` lines of a message, and how many more there are."""
    return lines[:limit] + ([f"  ... (+{len(lines) - limit} more)"] if len(lines) > limit else [])


def describe_model(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return config.describe() if isinstance(config, MiniMindConfig) else type(model).__name__
