"""LoRA (Hu et al. 2021): train a low-rank update ``B @ A`` beside each frozen weight instead of the weight itself.

    y = x Wᵀ + dropout(x) Aᵀ Bᵀ · alpha / rank        A: [rank, in] (kaiming-uniform), B: [out, rank] (zeros)

B starts at zero, so a freshly wrapped model computes exactly what the base model computes.

Typical use (trainer/train_lora.py, eval_llm.py):

    names = apply_lora(model, rank=16)          # wraps q/k/v/o and the MLP projections, freezes everything else
    ... train: only LoRA parameters have requires_grad ...
    save_lora(model, lora_path("identity", model.config))   # out/lora/lora_identity_512.pth, a few MB

    load_lora(base_model, "out/lora/lora_identity_512.pth")  # rebuilds the layers from the file's own config
    merge_lora(base_model)                      # optional: fold B @ A into W, a plain model again

Unlike MiniMind (LoRA on square layers only, i.e. q/o with GQA), the default targets are every projection of
attention and MLP, MoE experts included; ``targets="square"`` reproduces MiniMind's choice.

DoRA (Liu et al. 2024, ``apply_lora(model, lora_type="dora")``) splits each weight into a magnitude per output row
and a direction; the low-rank update moves the direction, the magnitude m trains on its own:

    W' = m · (W + B·A·scale) / ‖W + B·A·scale‖        ‖·‖ per output row; m starts as ‖W‖, so W' = W at init

The file records the type, so ``load_lora`` and ``merge_lora`` need no flag for it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from model.files import atomic_save, out_dir, resolve_path
from model.model_minimind import MiniMindConfig
from model.weights import describe_model, read_torch_file, short_lines, short_list, unwrap_model, unwrapped_name

# Llama-layout projections. "gate_proj" matches MoE experts' gate_proj but not the router, which is named "gate".
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """A Linear layer plus a trainable low-rank update; the base weight is frozen.

    It subclasses nn.Linear and takes over the base layer's own ``weight``/``bias`` Parameters (no copy) rather than
    holding the base layer as a child: a child would rename ``q_proj.weight`` to ``q_proj.base.weight``, while this
    way every base key of ``state_dict()`` stays exactly as it was, the LoRA tensors are the extra keys
    ``q_proj.lora_A`` / ``q_proj.lora_B``, and code that checks ``isinstance(m, nn.Linear)`` keeps working.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight matrix
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft (and nn.Linear) initialise it
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def low_rank_update(self, x: torch.Tensor) -> torch.Tensor:
        """x·Aᵀ·Bᵀ·scale: two thin matmuls (x·Aᵀ is [.., rank]) instead of forming the [out, in] product B·A."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.low_rank_update(self.lora_dropout(x))

    def adapted_weight(self) -> torch.Tensor:
        """The weight this layer computes with, W + B·A·scale, in fp32."""
        return self.weight.float() + (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged(self) -> nn.Linear:
        """Fold the update into the weight (in place, computed in fp32) and return a plain nn.Linear holding it."""
        with torch.no_grad():
            self.weight.copy_(self.adapted_weight().to(self.weight.dtype))
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias  # the same Parameters: nothing is copied
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


class DoRALinear(LoRALinear):
    """DoRA: ``W' = m · (W + B·A·scale) / ‖W + B·A·scale‖``, the norm taken over each output row's inputs.

    That is peft's "column-wise" norm (of the [in, out] matrix it transposes to), and as in peft (and the paper, §4.3)
    the norm is a constant to the gradient: A and B learn through the direction, ``lora_magnitude`` (one value per
    output feature, the extra key ``<layer>.lora_magnitude``) learns the length. The price: every forward forms the
    full [out, in] matrix W + B·A·scale to take its norm, which plain LoRA never does.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        with torch.no_grad():  # B = 0, so this is ‖W‖ and the layer starts as exactly the base layer
            self.lora_magnitude = nn.Parameter(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """‖W + B·A·scale‖ of each output row, computed in fp32, in the weight's dtype."""
        return torch.linalg.vector_norm(super().adapted_weight(), dim=1).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # detached, as in the paper and peft: no [out, in] graph kept for the backward
            norm = self.weight_norm()
        factor = self.lora_magnitude / norm  # exactly 1 at init: m was computed as this very norm
        base = F.linear(x, self.weight)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            # peft's form under dropout: the magnitude's rescale of the base output sees the dropped-out input too
            dropped = self.lora_dropout(x)
            out = base + (factor - 1) * F.linear(dropped, self.weight) + factor * self.low_rank_update(dropped)
        else:
            out = factor * (base + self.low_rank_update(x))
        return out if self.bias is None else out + self.bias

    def adapted_weight(self) -> torch.Tensor:
        weight = super().adapted_weight()
        return weight * (self.lora_magnitude.float() / torch.linalg.vector_norm(weight, dim=1)).unsqueeze(1)


LAYER_TYPES: dict[str, type[LoRALinear]] = {"lora": LoRALinear, "dora": DoRALinear}
ADAPTER_SUFFIXES = (".lora_A", ".lora_B", ".lora_magnitude")  # the state-dict keys an adapter adds


def apply_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
    lora_type: str = "lora",
) -> list[str]:
    """Wrap the target Linear layers of ``model`` in place and freeze every other parameter. Returns the names wrapped.

    ``alpha`` defaults to ``rank`` (scale 1): MiniMind's LoRA adds B·A unscaled, so its learning rates (1e-4) carry
    over, and it equals peft's default at rank 8. ``targets`` is ``"square"`` (MiniMind's rule: every Linear with a
    square weight, which with GQA means q_proj/o_proj only), or names/regexes: an entry matches a layer whose full name
    equals it, ends with ``.<entry>``, or fully matches it as a regex (``r"model\\.layers\\.[0-3]\\..*_proj"``).
    The MoE router (``mlp.gate``) is not among the default targets; the experts' projections are.
    ``lora_type="dora"`` makes DoRA layers (``DoRALinear``: a trainable magnitude per output feature besides A and B).
    Apply it before wrapping the model in DDP or torch.compile: they capture the parameters they see.
    """
    model = unwrap_model(model)
    if _lora_layers(model):
        raise ValueError("the model already has LoRA layers: merge_lora() it first, or load_lora() into them")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if lora_type not in LAYER_TYPES:
        raise ValueError(f"LoRA type must be one of {', '.join(LAYER_TYPES)}, got {lora_type!r}")
    alpha = float(rank if alpha is None else alpha)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [name for name, m in linears.items() if _is_target(name, m, targets)]
    if not chosen:
        raise ValueError(f"no Linear layer matches targets {targets!r}; Linear layers: {short_list(list(linears))}")
    # Merging into a weight shared with another module (the tied lm_head/embedding) would change both.
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    tied = [name for name in chosen if counts[id(linears[name].weight)] > 1]
    if tied:
        raise ValueError(f"{short_list(tied)}: the weight is tied to another module (e.g. lm_head to the embedding); "
                         "LoRA on it could not be merged. Choose other targets.")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _replace(model, name, LAYER_TYPES[lora_type](linears[name], rank, alpha, dropout))
    return chosen


def _is_target(name: str, module: nn.Linear, targets: str | Sequence[str]) -> bool:
    if targets == "square":
        return module.weight.shape[0] == module.weight.shape[1]
    patterns = [targets] if isinstance(targets, str) else targets
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, LoRALinear)}


def _type_of(layer: LoRALinear) -> str:
    return next(name for name, cls in LAYER_TYPES.items() if type(layer) is cls)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors (A, B; DoRA's magnitude), named as in the bare model (DDP's ``module.`` and
    compile's ``_orig_mod.`` removed)."""
    return {
        name: tensor.detach()
        for name, tensor in unwrap_model(model).state_dict().items()
        if name.endswith(ADAPTER_SUFFIXES)
    }


def lora_config(model: nn.Module) -> dict[str, Any]:
    """What ``load_lora`` needs to rebuild the layers: type, rank, alpha, dropout, the layer names, the base shape."""
    model = unwrap_model(model)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (call apply_lora or load_lora first)")
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config: dict[str, Any] = dict(lora_type=_type_of(first), rank=first.rank, alpha=first.alpha, dropout=dropout,
                                  targets=list(layers))
    base = getattr(model, "config", None)
    if isinstance(base, MiniMindConfig):
        config.update(hidden_size=base.hidden_size, num_hidden_layers=base.num_hidden_layers, base=base.describe())
    return config


def save_lora(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``{"lora_config": ..., "weights": ...}`` atomically; loads with ``torch.load(weights_only=True)``.

    ``dtype=torch.float16`` halves the file; the default keeps the training dtype (rank 16 on the 26M model is 4.6 MB
    in fp32 with the default targets, 1 MB on square layers only, so there is little to save).
    """
    weights = {k: v.to("cpu", dtype or v.dtype) for k, v in lora_state_dict(model).items()}
    path = Path(path)
    atomic_save({"lora_config": lora_config(model), "weights": weights}, path)
    return path


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, weights) of a LoRA file: ours, or MiniMind's flat ``<layer>.lora.{A,B}.weight`` state dict
    (which stores no config: rank comes from the shapes, and alpha = rank because MiniMind does not scale)."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    data = read_torch_file(path)
    if isinstance(data, dict) and "lora_config" in data:
        config, weights = dict(data["lora_config"]), data["weights"]
    elif isinstance(data, dict) and data and all(k.endswith((".lora.A.weight", ".lora.B.weight")) for k in data):
        rename = {".lora.A.weight": ".lora_A", ".lora.B.weight": ".lora_B"}
        weights = {k[: -len(end)] + rename[end]: v for k, v in data.items() for end in rename if k.endswith(end)}
        rank = next(v.shape[0] for k, v in weights.items() if k.endswith(".lora_A"))
        targets = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in weights))
        # MiniMind adapts every layer, so its base has as many layers as the file's highest layer index + 1.
        layers = 1 + max((int(m.group(1)) for t in targets if (m := re.match(r"model\.layers\.(\d+)\.", t))),
                         default=-1)
        config = dict(rank=rank, alpha=float(rank), dropout=0.0, targets=targets, num_hidden_layers=layers or None)
    else:
        raise ValueError(f"{path} is not a LoRA file (no lora_config, no *.lora.A.weight tensors); "
                         "a full checkpoint loads with model.weights.load_weights")
    config["targets"] = [unwrapped_name(t) for t in config["targets"]]
    config.setdefault("lora_type", "lora")  # files saved before DoRA existed
    if config["lora_type"] not in LAYER_TYPES:
        raise ValueError(f"{path}: unknown LoRA type {config['lora_type']!r} (this version knows "
                         f"{', '.join(LAYER_TYPES)})")
    return config, {unwrapped_name(k): v for k, v in weights.items()}


def load_lora(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a LoRA file into ``model``: wraps the layers the file names (with its type, rank and alpha) unless the
    model has LoRA layers already, then loads every LoRA tensor strictly. Returns the names of the LoRA layers.

    A file that does not fit (another hidden size, more layers, another rank) is refused before the model is touched,
    with each offending tensor, both shapes, and the base hidden size the file needs.
    """
    config, weights = read_lora_file(path)
    model = unwrap_model(model)
    _check_fits(model, config, weights, path)
    if not _lora_layers(model):
        apply_lora(model, config["rank"], config["alpha"], config.get("dropout", 0.0), targets=config["targets"],
                   lora_type=config["lora_type"])
    with torch.no_grad():
        for key, param in lora_state_dict(model).items():
            param.copy_(weights[key])  # copy_ casts an fp16 file to the model's dtype
    for layer in _lora_layers(model).values():  # layers that were there already take the file's scale too
        layer.alpha, layer.scale = config["alpha"], config["alpha"] / layer.rank
    return list(_lora_layers(model))


def _check_fits(model: nn.Module, config: dict[str, Any], weights: dict[str, torch.Tensor], path: Any) -> None:
    modules = dict(model.named_modules())
    existing = _lora_layers(model)
    problems, missing = [], []
    for name in config["targets"]:
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear) or (existing and not isinstance(layer, LoRALinear)):
            missing.append(name)
            continue
        rank = layer.rank if isinstance(layer, LoRALinear) else config["rank"]
        needs = {f"{name}.lora_A": (rank, layer.in_features), f"{name}.lora_B": (layer.out_features, rank)}
        if isinstance(layer, LoRALinear) and _type_of(layer) != config["lora_type"]:
            problems.append(f"  {name}: the model's layer is {_type_of(layer)}, the file is {config['lora_type']}")
        if config["lora_type"] == "dora":
            needs[f"{name}.lora_magnitude"] = (layer.out_features,)
        for key, need in needs.items():
            have = tuple(weights[key].shape) if key in weights else None
            if have != need:
                problems.append(f"  {key}: file has {have}, model needs {need}")
    untouched = [name for name in existing if name not in config["targets"]]
    file_layers = config.get("num_hidden_layers")  # None in files saved before it was recorded
    model_layers = getattr(getattr(model, "config", None), "num_hidden_layers", file_layers)
    if file_layers is not None and file_layers != model_layers:
        problems.append(f"  the file adapts a {file_layers}-layer model; this one has {model_layers} layers")
    if not (problems or missing or untouched):
        return
    lines = [f"LoRA file {path} does not fit this model ({describe_model(model)})."]
    lines += ["Shape mismatches:", *short_lines(problems)] if problems else []
    lines += [f"Layers the file adapts that this model lacks (or has no LoRA on): {short_list(missing)}"] if missing else []
    lines += [f"LoRA layers of the model the file has no tensors for: {short_list(untouched)}"] if untouched else []
    hidden = config.get("hidden_size") or _hidden_size_of(weights)
    saved_from = f" (saved from {config['base']})" if "base" in config else ""
    lines.append(f"The file needs a base with hidden_size {hidden}{saved_from}.")
    raise ValueError("\n".join(lines))


def _hidden_size_of(weights: dict[str, torch.Tensor]) -> int | str:
    """The base hidden size, read off the LoRA tensors: the input width of q/k/v/gate/up, the output of o/down."""
    for key, tensor in weights.items():
        if key.endswith(("q_proj.lora_A", "k_proj.lora_A", "v_proj.lora_A", "gate_proj.lora_A", "up_proj.lora_A")):
            return tensor.shape[1]
        if key.endswith(("o_proj.lora_B", "down_proj.lora_B")):
            return tensor.shape[0]
    return "(unknown)"


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update (DoRA: magnitude and direction) into its base weight and put plain nn.Linear layers
    back, in place.

    The result has exactly the base model's state-dict keys: save it with ``model.weights.save_weights`` as an ordinary
    checkpoint that needs no LoRA code. Parameters stay frozen as apply_lora left them. In bf16/fp16 the merged weight
    is rounded to that dtype, so logits differ from the unmerged model by rounding.
    """
    model = unwrap_model(model)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    for name, layer in layers.items():
        _replace(model, name, layer.merged())
    return model


def lora_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; after apply_lora the trainable ones are the adapter's (A, B; DoRA's m)."""
    params = list(unwrap_model(model).parameters())  # a tied embedding/head counts once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_summary(model: nn.Module) -> str:
    """``LoRA: 0.26M trainable / 26.09M total (1.00%)`` (rank 16 on the square layers of the 26M model); ``DoRA: ...``
    for DoRA layers."""
    trainable, total = lora_parameter_count(model)
    kind = "DoRA" if any(isinstance(m, DoRALinear) for m in _lora_layers(model).values()) else "LoRA"
    return f"{kind}: {trainable / 1e6:.2f}M trainable / {total / 1e6:.2f}M total ({100 * trainable / total:.2f}%)"


def lora_path(name: str, config: MiniMindConfig, directory: str | os.PathLike | None = None) -> Path:
    """MiniMind's naming: ``<out>/lora/lora_<name>_<hidden>[_moe].pth``, e.g. ``out/lora/lora_identity_512.pth``;
    ``directory`` is the same ``--out_dir`` the other stages use (default ``out/``)."""
    return out_dir(directory) / "lora" / f"lora_{name}_{config.suffix}.pth"
