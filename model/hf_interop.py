"""Transformers interop: read a transformers folder (ours, or a stock ``llama``/``qwen3`` one of a shape this model can
hold) and write a model as one, loadable by ``AutoModelForCausalLM`` without this repo. For llama.cpp see
``model/export_gguf.py``."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from model.files import resolve_path
from model.generation import generation_config
from model.model_minimind import MiniMindConfig
from model.weights import read_state_dict, unwrap_model

if TYPE_CHECKING:
    from transformers import LlamaConfig, Qwen3Config


def read_transformers_folder(folder: str | os.PathLike) -> tuple[MiniMindConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a transformers folder: ``minimind``, or ``llama``/``qwen3`` (same tensor names)."""
    from transformers import AutoConfig

    folder = resolve_path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a transformers folder (no config.json)")
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    if model_type == "minimind":
        config = MiniMindConfig.from_pretrained(str(folder))
    else:
        config = config_from_transformers(AutoConfig.from_pretrained(str(folder)))
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no weights in {folder} (expected *.safetensors or pytorch_model*.bin)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_state_dict(file))
    return config, state


def config_from_transformers(hf: Any) -> MiniMindConfig:
    """A ``LlamaConfig`` / ``Qwen3Config`` as our config; refuses what this model cannot compute (biases, other RoPE
    kinds, sliding windows) rather than load it into something that computes different numbers."""
    if hf.model_type not in ("llama", "qwen3"):
        raise ValueError(f"model_type {hf.model_type!r} is not one this repo can load (minimind, llama, qwen3)")
    unsupported = [name for name in ("attention_bias", "mlp_bias", "use_sliding_window") if getattr(hf, name, False)]
    if getattr(hf, "hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf.hidden_act}")
    rope = dict(hf.rope_parameters or {})
    rope_type, theta = rope.pop("rope_type", "default"), rope.pop("rope_theta", 10000.0)
    if rope_type not in ("default", "yarn"):
        unsupported.append(f"rope_type={rope_type}")
    if unsupported:
        raise ValueError(f"this {hf.model_type} config uses {', '.join(unsupported)}, which MiniMind does not have")
    fields = {k: getattr(hf, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")}
    fields["head_dim"] = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return MiniMindConfig(**fields, qk_norm=hf.model_type == "qwen3", rope_theta=theta,
                          rope_scaling={"type": "yarn", **rope} if rope_type == "yarn" else None)


def config_to_transformers(config: MiniMindConfig) -> LlamaConfig | Qwen3Config:
    """Our dense config as a stock ``LlamaConfig`` (or ``Qwen3Config`` with q/k-norm), transformers-5 fields."""
    from transformers import LlamaConfig, Qwen3Config

    if config.use_moe:
        raise ValueError("MoE has no stock transformers class of this layout; save it with save_pretrained")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {**{k: v for k, v in config.rope_scaling.items() if k not in ("type", "rope_type")}, **rope,
                "rope_type": "yarn"}
        rope.setdefault("original_max_position_embeddings", 2048)  # our default (rope_inv_freq), made explicit
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=config.tie_word_embeddings, attention_bias=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if config.qk_norm:
        return Qwen3Config(**fields, use_sliding_window=False)
    return LlamaConfig(**fields, mlp_bias=False)


def save_transformers(model: nn.Module, tokenizer: Any, folder: str | os.PathLike,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` as a transformers folder: safetensors, config, generation config, tokenizer, chat template.

    Dense models become a stock ``LlamaForCausalLM`` (q/k-norm: ``Qwen3ForCausalLM``), loadable by
    ``AutoModelForCausalLM`` without ``trust_remote_code`` (for llama.cpp see ``model/export_gguf.py``). MoE is saved
    as our own class (``model_type: minimind``): it loads where this repo is installed, or with
    ``trust_remote_code=True`` anywhere (``model_minimind.py`` is copied beside it and named in ``auto_map``).
    """
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    model = unwrap_model(model)
    if any(name.endswith((".lora_A", ".lora_B")) for name in model.state_dict()):
        raise ValueError("the model has unmerged LoRA layers: merge them first (model.model_lora.merge_lora), or "
                         "save the adapter alone with save_lora")
    folder = resolve_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model.config.use_moe:
        out = copy.deepcopy(model).to("cpu", dtype)
        out.config.auto_map = {"AutoConfig": "model_minimind.MiniMindConfig",
                               "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"}
        shutil.copy(Path(__file__).with_name("model_minimind.py"), folder / "model_minimind.py")
    else:
        hf_config = config_to_transformers(model.config)
        out = (Qwen3ForCausalLM if model.config.qk_norm else LlamaForCausalLM)(hf_config)
        out.load_state_dict({k: v.to("cpu") for k, v in model.state_dict().items()}, strict=True)
        out = out.to(dtype)
    # eos [<|im_end|>, <|endoftext|>]: without it, generate() runs to max_length (MiniMind users' "endless" replies).
    out.generation_config = generation_config(tokenizer)
    out.save_pretrained(str(folder))
    for weights in folder.glob("*.safetensors"):  # safetensors writes them 0600; the files beside them have the umask's
        shutil.copymode(folder / "config.json", weights)
    tokenizer.save_pretrained(str(folder))
    _portable_tokenizer_config(folder / "tokenizer_config.json")
    return folder


def _portable_tokenizer_config(path: Path) -> None:
    """Make tokenizer_config.json loadable by transformers 4.x too (llama.cpp's converter pins 4.57): transformers 5
    writes ``"tokenizer_class": "TokenizersBackend"`` and a list-typed ``extra_special_tokens``, 4.x knows neither."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # how this copy was loaded, not a property of the tokenizer
        config.pop(key, None)
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list) and extra:
        config["additional_special_tokens"] = extra
    elif isinstance(extra, dict) and extra:
        config["extra_special_tokens"] = extra
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
