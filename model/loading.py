"""The one way to find, save and load weights and tokenizers, with errors that say what to do.

Everything that reads or writes a checkpoint (trainers, eval_llm.py, scripts/, notebooks) goes through here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    """Where checkpoints go: ``out/`` under the repo root by default; a relative --out_dir also counts from there."""
    path = Path(path).expanduser() if path else OUT_DIR
    return path if path.is_absolute() else REPO_ROOT / path


def checkpoint_path(stage: str, config: MiniMindConfig, directory: str | os.PathLike | None = None) -> Path:
    """MiniMind's naming: ``out/<stage>_<hidden>[_moe].pth``, e.g. ``out/full_sft_512.pth``."""
    return out_dir(directory) / f"{stage}_{config.suffix}.pth"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file beside ``path``, then rename: a crash mid-write never leaves a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """A plain state dict in MiniMind's layout (half precision by default), written atomically."""
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in model.state_dict().items()}
    atomic_save(state, path)
    return Path(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.pth`` (loaded with ``weights_only=True``: no pickled code runs) or ``.safetensors`` file."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a resume file: the weights are one entry of it
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint strictly into ``model`` (fp16/bf16/fp32 are cast to the model's dtype).

    A file of another shape fails with one message naming each mismatched parameter, both shapes, and the config
    the file needs, never a silent ``strict=False``. Tied ``lm_head.weight`` may be absent from the file.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    for key, source in tied.items():  # checkpoints may store the tied head or omit it
        if key not in state and source in state:
            state[key] = state[source]
    problems = [
        f"  {k}: file has {tuple(v.shape)}, model has {tuple(own[k].shape)}"
        for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if problems or missing or unexpected:
        lines = [f"checkpoint {path} does not fit this model ({_describe(model)})."]
        lines += ["Shape mismatches:", *problems] if problems else []
        lines += [f"Missing from the file: {_short(missing)}"] if missing else []
        lines += [f"Not in the model: {_short(unexpected)}"] if unexpected else []
        lines.append(f"The file needs: {infer_config_hint(state)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return model


def _short(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return config.describe() if isinstance(config, MiniMindConfig) else type(model).__name__


def infer_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Read the shape of a MiniMind checkpoint off its tensors (hidden size, layers, heads, MoE, q/k-norm)."""
    hidden = state["model.embed_tokens.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    q_norm = state.get("model.layers.0.self_attn.q_norm.weight")
    head_dim = q_norm.shape[0] if q_norm is not None else None
    fields: dict[str, Any] = dict(
        vocab_size=state["model.embed_tokens.weight"].shape[0], hidden_size=hidden, num_hidden_layers=layers,
        qk_norm=q_norm is not None,
    )
    experts = {int(k.split(".")[5]) for k in state if ".mlp.experts." in k}
    fields["use_moe"] = bool(experts)
    if experts:
        fields["n_routed_experts"] = len(experts)
        fields["n_shared_experts"] = len({int(k.split(".")[5]) for k in state if ".mlp.shared_experts." in k})
        fields["intermediate_size"] = state["model.layers.0.mlp.experts.0.up_proj.weight"].shape[0]
    else:
        fields["intermediate_size"] = state["model.layers.0.mlp.up_proj.weight"].shape[0]
    if head_dim is not None:
        fields["head_dim"] = head_dim
    return fields


def infer_config_hint(state: dict[str, torch.Tensor]) -> str:
    try:
        f = infer_config_from_state_dict(state)
    except (KeyError, ValueError, IndexError):
        return "(not a MiniMind checkpoint: no model.embed_tokens.weight / model.layers.* tensors)"
    return MiniMindConfig(**f).describe()


def load_tokenizer(path: str | os.PathLike | None = None):
    """The shipped tokenizer (``model/``) or another folder, e.g. MiniMind's own (same special ids 0/1/2)."""
    from transformers import AutoTokenizer

    folder = resolve_path(path) if path else TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {folder} (expected tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(folder))
