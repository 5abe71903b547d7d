"""The config a checkpoint needs, read off its tensors: the shape they tell (vocabulary, hidden size, layers, MLP
width, MoE, q/k-norm, tied head), completed from the config saved beside the file or from the preset of that shape.
This is how ``load_model`` builds the right model for a bare ``.pth`` and how mismatch messages name the flags a file
needs."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from model.files import config_path
from model.model_minimind import PRESETS, MiniMindConfig


def shape_of_state_dict(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The config fields a MiniMind checkpoint's tensors tell (vocabulary, hidden size, layers, MLP width, MoE,
    q/k-norm and its head_dim, tied head); KeyError/ValueError/IndexError when it is not one."""
    hidden = state["model.embed_tokens.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    q_norm = state.get("model.layers.0.self_attn.q_norm.weight")
    head_dim = q_norm.shape[0] if q_norm is not None else None
    fields: dict[str, Any] = dict(
        vocab_size=state["model.embed_tokens.weight"].shape[0], hidden_size=hidden, num_hidden_layers=layers,
        qk_norm=q_norm is not None, tie_word_embeddings=head_is_tied(state),
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


def head_is_tied(state: dict[str, torch.Tensor]) -> bool:
    """Whether the file's LM head is its embedding: absent, the same storage (tied when saved), or equal values."""
    head, embedding = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is None or embedding is None:
        return True
    return head.data_ptr() == embedding.data_ptr() or (head.shape == embedding.shape and torch.equal(head, embedding))


def describe_checkpoint(state: dict[str, torch.Tensor], source: str | os.PathLike = "checkpoint") -> str:
    """The config ``state`` needs, as the flags a trainer takes (``MiniMindConfig.describe``)."""
    try:
        return config_for_state_dict(state, source).describe()
    except ValueError:
        return "(not a MiniMind checkpoint: no model.embed_tokens.weight / model.layers.* tensors)"


def config_for_state_dict(
    state: dict[str, torch.Tensor],
    source: str | os.PathLike = "checkpoint",
    preset: str | None = None,
) -> MiniMindConfig:
    """The config that fits ``state``: its shape read off the tensors; the rest from the config ``save_weights`` wrote
    beside the file, else from the preset (given, or the one of the same shape)."""
    try:
        found = shape_of_state_dict(state)
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"{source} is not a MiniMind checkpoint (no model.embed_tokens.weight / model.layers.* "
                         "tensors); a LoRA file goes to --lora_weight") from None
    saved = _saved_config(source, found)
    return saved if saved is not None else _config_from_preset(state, found, preset)


def _saved_config(source: str | os.PathLike, found: dict[str, Any]) -> MiniMindConfig | None:
    """The config saved beside the weights file ``source``, if there is one and it has the tensors' shape."""
    path = config_path(source)
    if not path.is_file():
        return None
    try:
        config = MiniMindConfig.from_json_file(str(path))
    except (OSError, ValueError, TypeError) as e:
        print(f"note: ignoring {path} ({e})", file=sys.stderr)
        return None
    differs = [k for k, v in found.items() if getattr(config, k, None) != v]
    if differs:
        print(f"note: ignoring {path}: it describes another shape ({', '.join(differs)})", file=sys.stderr)
        return None
    return config


def _config_from_preset(state: dict[str, torch.Tensor], found: dict[str, Any], preset: str | None) -> MiniMindConfig:
    """The tensors' shape ``found`` over the fields of ``preset`` (or of the preset of that shape), heads included."""
    fields = {**(PRESETS[preset] if preset else _preset_of_shape(found)), **found}
    # Heads: with q/k-norm the file tells head_dim; otherwise it cannot, and MiniMind's 8 heads (or the preset's)
    # are assumed, as every trainer here builds them.
    head_dim = fields.get("head_dim") or fields["hidden_size"] // fields.get("num_attention_heads", 8)
    fields["head_dim"] = head_dim
    fields["num_attention_heads"] = state["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim
    fields["num_key_value_heads"] = state["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim
    return MiniMindConfig(**fields)


def _preset_of_shape(found: dict[str, Any]) -> dict[str, Any]:
    """The preset with the shape read off a checkpoint (hidden, layers, MoE, q/k-norm, shared experts), or {}."""
    keys = ("hidden_size", "num_hidden_layers", "use_moe", "qk_norm", "n_shared_experts")
    # A field a preset leaves out: use_moe/qk_norm mean off; n_shared_experts matches anything (dense presets omit
    # it, and only MoE files have a count to compare).
    defaults = dict(use_moe=False, qk_norm=False, n_shared_experts=found.get("n_shared_experts"))
    for preset in PRESETS.values():
        if all(preset.get(k, defaults.get(k)) == found.get(k) for k in keys):
            return preset
    return {}
