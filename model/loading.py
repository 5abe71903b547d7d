"""The one way to find, save and load weights and tokenizers, with errors that say what to do.

Everything that reads or writes a checkpoint (trainers, eval_llm.py, scripts/, notebooks) goes through here.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import nn

from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerBase, Qwen3Config

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "out"
TOKENIZER_DIR = REPO_ROOT / "model"


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model it is loaded into; the message says what the file needs."""


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


def save_weights(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """A plain state dict in MiniMind's layout (half precision by default), written atomically, with the model's
    config beside it (``full_sft_512.pth`` -> ``full_sft_512.json``): the tensors tell the shape, but not what
    ``load_model`` would otherwise have to guess from a preset (MoE top-k, RMSNorm eps, aux-loss alpha)."""
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}
    config = getattr(model, "config", None)
    if isinstance(config, MiniMindConfig):
        atomic_write(config_path(path), lambda f: f.write(config.to_json_string(use_diff=False).encode()))
    atomic_save(state, path)
    return Path(path)


def config_path(weights: str | os.PathLike) -> Path:
    """The config file that ``save_weights`` writes beside a weights file."""
    return Path(weights).with_suffix(".json")


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
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and not _head_is_tied(state):
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


def shape_of_state_dict(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The config fields a MiniMind checkpoint's tensors tell (vocabulary, hidden size, layers, MLP width, MoE,
    q/k-norm and its head_dim, tied head); KeyError/ValueError/IndexError when it is not one."""
    hidden = state["model.embed_tokens.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    q_norm = state.get("model.layers.0.self_attn.q_norm.weight")
    head_dim = q_norm.shape[0] if q_norm is not None else None
    fields: dict[str, Any] = dict(
        vocab_size=state["model.embed_tokens.weight"].shape[0], hidden_size=hidden, num_hidden_layers=layers,
        qk_norm=q_norm is not None, tie_word_embeddings=_head_is_tied(state),
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


def _head_is_tied(state: dict[str, torch.Tensor]) -> bool:
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


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The shipped tokenizer (``model/``) or another folder, e.g. MiniMind's own (needed for MiniMind's weights)."""
    from transformers import AutoTokenizer

    folder = resolve_path(path) if path else TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {folder} (expected tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------------------------------
# A model for inference: stage name / .pth / transformers folder (+ LoRA) -> (model, tokenizer)

# The training script that writes each stage's checkpoint, for "make it with ..." messages.
TRAIN_SCRIPTS = {"pretrain": "train_pretrain.py", "full_sft": "train_full_sft.py", "dpo": "train_dpo.py",
                 "grpo": "train_grpo.py", "ppo_actor": "train_ppo.py"}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# MiniMind's --inference_rope_scaling, attention_factor 1.0 included (its choice), so its weights give its numbers.
YARN_16X = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 2048, "beta_fast": 32, "beta_slow": 1,
            "attention_factor": 1.0}


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def check_device(device: str | torch.device) -> str:
    """``device`` if this machine has it, else a ValueError naming the best one it has (not torch's assertion)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"device {str(device)!r} is not usable here ({reason}); this machine has {best_device()!r}") \
            from None
    return str(device)


def inference_dtype(device: str | torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``auto``: bf16 on CUDA (fp16 on GPUs without bf16), fp16 on MPS, fp32 on CPU (fp16 matmuls crawl on CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype and dtype != "auto":
        return getattr(torch, dtype)
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if kind == "mps" else torch.float32


def load_model(
    weight: str | os.PathLike = "full_sft",
    *,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    use_moe: bool | None = None,
    preset: str | None = None,
    lora: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    directory: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    rope_scaling: dict | None = None,
) -> tuple[MiniMindForCausalLM, PreTrainedTokenizerBase]:
    """The model (eval mode, on ``device``) and its tokenizer, from any of:

    - a stage name, as MiniMind names checkpoints: ``"full_sft"`` -> ``<directory>/full_sft_512.pth`` (the shape
      flags pick the suffix: ``hidden_size``/``use_moe``/``preset``; default 512 dense);
    - a path to a ``.pth`` / ``.safetensors`` state dict (ours or an official MiniMind one);
    - a transformers folder (``config.json`` + weights): ours (``minimind``), or a ``llama``/``qwen3`` one of a
      shape this model can hold (what ``save_transformers`` writes, and what MiniMind's released folders hold).

    The file decides the shape: the config is read off the tensors, so ``--weight full_sft --hidden_size 768`` loads
    the 16-layer MiniMind2 without ``--num_hidden_layers 16``; flags that disagree with the file get a note on
    stderr. Fields the tensors cannot tell (RMSNorm eps, MoE top-k) come from ``preset`` or from the preset of the
    same shape. ``lora``: a LoRA name (``out/lora/lora_<name>_<suffix>.pth``) or path, merged into the weights (same
    outputs as the unmerged adapter, no extra cost per token). ``tokenizer``: a folder (default: the folder's own,
    else ours in ``model/``); MiniMind's released weights need MiniMind's (same special ids, other vocabulary). A
    file whose config records another vocabulary than the tokenizer's is refused.
    ``rope_scaling``: e.g. ``YARN_16X`` to extend the context at inference (MiniMind's --inference_rope_scaling).
    """
    from model.generation import stop_token_ids

    source = find_weights(weight, hidden_size=hidden_size, use_moe=use_moe, preset=preset, directory=directory)
    if source.is_dir():
        config, state = read_transformers_folder(source)
    else:
        state = read_state_dict(source)
        config = config_for_state_dict(state, source, preset=preset)
        # The file decides the shape; size flags that disagree with it only get a note.
        typed = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=use_moe)
        for flag, value in typed.items():
            if value is not None and value != getattr(config, flag):
                print(f"note: {source} has --{flag} {int(getattr(config, flag))}, not {int(value)}: using the file's "
                      "shape", file=sys.stderr)
    if rope_scaling:
        config.rope_scaling = rope_scaling
    model = MiniMindForCausalLM(config)
    model.name_or_path = str(source)  # where it came from, as from_pretrained records it (the server names it)
    load_state_dict_into(model, state, source)
    if lora:
        _merge_lora_file(model, lora, directory)
    folder_tokenizer = source.is_dir() and (source / "tokenizer_config.json").is_file()
    tok = load_tokenizer(source if folder_tokenizer and tokenizer is None else tokenizer)
    if folder_tokenizer and config.tokenizer_vocab is None:  # a Llama export's vocabulary: the tokenizer saved with it
        config.tokenizer_vocab = vocab_fingerprint(tok) if tokenizer is None else _folder_vocabulary(source)
    check_vocabulary(config.tokenizer_vocab, vocab_fingerprint(tok), source,
                     "pass --tokenizer with the folder it was trained with")
    if tokenizer is None and config.tokenizer_vocab is None:
        print(f"note: {source} does not record its tokenizer; using the one in model/. MiniMind's released weights "
              f"need MiniMind's (--tokenizer path/to/minimind/model), or the replies are gibberish", file=sys.stderr)
    device = check_device(device or best_device())
    model = model.to(device=device, dtype=inference_dtype(device, dtype)).eval()
    # So a bare model.generate() (a notebook's) stops at <|im_end|> too, instead of running to max_length.
    model.generation_config.eos_token_id = stop_token_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _folder_vocabulary(folder: Path) -> str | None:
    """The vocabulary of the tokenizer saved in a transformers folder; None (with a note) when it does not load."""
    try:
        return vocab_fingerprint(load_tokenizer(folder))
    except (OSError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        print(f"note: the tokenizer in {folder} does not load ({reason}); the vocabulary of --tokenizer is not "
              f"checked against it", file=sys.stderr)
        return None


def looks_like_path(text: str) -> bool:
    """Whether a --weight / --lora_weight value is a file path (a weights suffix or a folder in it) rather than a
    name such as ``full_sft`` that the naming scheme turns into a path."""
    return Path(text).suffix in WEIGHT_SUFFIXES or "/" in text or os.sep in text


def find_weights(
    weight: str | os.PathLike,
    hidden_size: int | None = None,
    use_moe: bool | None = None,
    preset: str | None = None,
    directory: str | os.PathLike | None = None,
) -> Path:
    """The file or folder ``weight`` names; a missing one fails naming the path and the command that makes it."""
    text = str(weight)
    if looks_like_path(text) or Path(text).expanduser().exists():
        path = resolve_path(text)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        return path
    shape = dict(PRESETS[preset]) if preset else {}
    shape.update({k: v for k, v in (("hidden_size", hidden_size), ("use_moe", use_moe)) if v is not None})
    shape.setdefault("hidden_size", 512)
    path = checkpoint_path(text, MiniMindConfig(**shape), directory)
    if path.is_file():
        return path
    others = _stage_files(path.parent, text)
    if len(others) == 1 and hidden_size is None and use_moe is None and preset is None:
        print(f"note: using {others[0][0]} (the only {text} checkpoint there)", file=sys.stderr)
        return others[0][0]
    raise FileNotFoundError(_missing_checkpoint_message(path, text, others, shape, directory))


# MiniMind's checkpoint names: <stage>_<hidden>[_moe].pth
_STAGE_FILE = re.compile(r"(?P<stage>.+)_(?P<hidden>\d+)(?P<moe>_moe)?\.pth")


def _stage_files(folder: Path, stage: str) -> list[tuple[Path, str, bool]]:
    """The checkpoints of ``stage`` in ``folder``, each with its hidden size (as the name writes it) and whether it
    is MoE."""
    files = []
    for path in sorted(folder.glob("*.pth")):
        match = _STAGE_FILE.fullmatch(path.name)
        if match and match["stage"] == stage:
            files.append((path, match["hidden"], bool(match["moe"])))
    return files


def _missing_checkpoint_message(path: Path, stage: str, others: list[tuple[Path, str, bool]], shape: dict[str, Any],
                                directory: str | os.PathLike | None) -> str:
    """Why ``stage`` has no checkpoint at ``path``: the other sizes there, the command that trains it (or, for a name
    no trainer uses, the checkpoints there), and the other ways to get weights."""
    lines = [f"no checkpoint {path}."]
    for other, hidden, moe in others:
        lines.append(f"Found {other}: load it with --hidden_size {hidden} --use_moe {int(moe)}")
    flags = f"--hidden_size {shape['hidden_size']} --use_moe {int(bool(shape.get('use_moe')))}"
    if stage in TRAIN_SCRIPTS:
        where = f" --out_dir {directory}" if directory else " (add --out_dir if you train elsewhere)"
        lines.append(f"Make it with: python trainer/{TRAIN_SCRIPTS[stage]} {flags}{where},")
    else:
        there = sorted(p.name for p in path.parent.glob("*.pth") if not p.stem.endswith("_resume"))
        lines.append(f"No training stage is called '{stage}' ({', '.join(TRAIN_SCRIPTS)}; other names come from "
                     f"--save_weight). Checkpoints in {path.parent}: {', '.join(there) or 'none'}.")
    lines.append("Or put MiniMind's released .pth there (ModelScope gongjy/minimind-3-pytorch), or pass a path or a "
                 "transformers folder (--load_from DIR).")
    return "\n".join(lines)


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


def _merge_lora_file(model: nn.Module, lora: str | os.PathLike, directory: str | os.PathLike | None) -> None:
    from model.model_lora import load_lora, lora_path, merge_lora

    text = str(lora)
    path = resolve_path(text) if looks_like_path(text) else lora_path(text, model.config, directory)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file {path}. Make it with: python trainer/train_lora.py --lora_name {text} "
                                f"--hidden_size {model.config.hidden_size} --use_moe {int(model.config.use_moe)}")
    load_lora(model, path)
    merge_lora(model)


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

    from model.generation import generation_config

    model = getattr(model, "module", model)
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


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags that pick a model, as MiniMind's eval_llm.py spells them; read them back with ``model_from_args``."""
    g = parser.add_argument_group("model (which weights; 加载哪个模型)")
    g.add_argument("--weight", default="full_sft",
                   help="stage name (out/<weight>_<hidden>[_moe].pth: pretrain, full_sft, dpo, ...) or a .pth path "
                        "(default full_sft)")
    g.add_argument("--load_from", default="model",
                   help="'model': our .pth weights (--weight); else a transformers folder "
                        "(save_pretrained / converted)")
    g.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (names the file like its flags)")
    g.add_argument("--hidden_size", type=int, default=None, help="picks the file suffix (default 512)")
    g.add_argument("--num_hidden_layers", type=int, default=None, help="optional: the file's own shape is used")
    g.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="picks the _moe file (default 0)")
    g.add_argument("--lora_weight", default=None, help="LoRA name (out/lora/lora_<name>_<hidden>.pth) or path")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the transformers folder's, else model/)")
    g.add_argument("--out_dir", "--save_dir", dest="out_dir", default=None,
                   help="where stage names are looked up (default: out/ in the repo)")
    g.add_argument("--inference_rope_scaling", action="store_true", help="YaRN x16 context extension (长文本外推)")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best there is)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 on CUDA, fp16 on MPS, fp32 on CPU")
    return parser


def weight_arg(args: argparse.Namespace) -> str:
    """The weights the flags of ``add_model_args`` name: --load_from's folder, else --weight."""
    return args.weight if args.load_from == "model" else args.load_from


def lora_arg(args: argparse.Namespace) -> str | None:
    """--lora_weight, None for no LoRA (MiniMind's scripts pass the word "None")."""
    return None if args.lora_weight in (None, "", "None", "none") else args.lora_weight


def model_from_args(args: argparse.Namespace) -> tuple[MiniMindForCausalLM, PreTrainedTokenizerBase]:
    """``load_model`` with the flags of ``add_model_args``."""
    return load_model(
        weight_arg(args), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        use_moe=None if args.use_moe is None else bool(args.use_moe), preset=args.preset, lora=lora_arg(args),
        tokenizer=args.tokenizer, directory=args.out_dir, device=args.device, dtype=args.dtype,
        rope_scaling=YARN_16X if args.inference_rope_scaling else None,
    )
