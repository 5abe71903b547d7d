"""The MiniMind model: a small decoder-only transformer, written out by hand.

Architecture (numerically a Llama; with ``qk_norm`` a Qwen3):
    token embedding -> N x [RMSNorm -> GQA attention with RoPE -> residual,
                            RMSNorm -> SwiGLU MLP (or a mixture of experts) -> residual]
    -> RMSNorm -> LM head (tied to the embedding)

Parameter names follow the Llama layout, so MiniMind2 checkpoints load with ``strict=True`` and the
dense model can be exported as a plain ``LlamaForCausalLM`` / ``Qwen3ForCausalLM``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

IGNORE_INDEX = -100  # a label that is not scored (prompt tokens, padding); cross_entropy's default ignore_index


def _mlp_width(hidden_size: int, multiplier: float) -> int:
    """SwiGLU width: ``multiplier * hidden`` rounded up to a multiple of 64 (1408 for 512 with 8/3)."""
    return 64 * math.ceil(multiplier * hidden_size / 64)


class MiniMindConfig(PretrainedConfig):
    """Hyper-parameters of a MiniMind model. Field names are MiniMind's, so its config.json loads as is.

    Build a named size with ``MiniMindConfig.from_preset("minimind2-small")`` (see ``PRESETS``).
    """

    model_type = "minimind"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 6400
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    intermediate_size: int | None = None  # None: 64 * ceil(8/3 * hidden_size / 64)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    # YaRN context extension, e.g. {"type": "yarn", "factor": 16, "original_max_position_embeddings": 2048,
    # "beta_fast": 32, "beta_slow": 1}; None = plain RoPE.
    rope_scaling: dict | None = None
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE (Qwen3, minimind-3)
    dropout: float = 0.0
    flash_attn: bool = True  # use torch's fused scaled_dot_product_attention (False: plain matmul softmax)
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    # Mixture of experts (MiniMind2-MoE: 4 routed experts, top-2, 1 shared expert)
    use_moe: bool = False
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    scoring_func: str = "softmax"
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1 (when k > 1, see next)
    # With norm_topk_prob, renormalise a top-1 weight too, so the one chosen expert gets weight 1.0 (minimind-3,
    # Qwen3-MoE); False keeps its router probability (MiniMind2 renormalises only when k > 1).
    norm_top1_prob: bool = False
    aux_loss_alpha: float = 0.01
    # Load-balancing loss (MoEFeedForward.aux_loss): "sequence" per sequence (MiniMind2), "batch" over all tokens of
    # the batch (minimind-3). MiniMind2's config.json says seq_aux: true / false instead, read as these (its
    # seq_aux=false variant, which no release used, divided the "batch" value by the top-k).
    aux_loss_form: str = "sequence"
    # Which token -> id map the embedding rows were trained under (model.weights.vocab_fingerprint); set by the
    # trainers, checked when weights are loaded, None when unknown (MiniMind's own releases).
    tokenizer_vocab: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = _mlp_width(self.hidden_size, 8 / 3)
        if "router_aux_loss_coef" in kwargs:
            self._read_minimind3_fields(kwargs)
        if "seq_aux" in kwargs:
            self.aux_loss_form = "sequence" if kwargs.pop("seq_aux") else "batch"
        super().__post_init__(**kwargs)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.scoring_func != "softmax":
            raise ValueError(f"scoring_func={self.scoring_func!r}: only 'softmax' is implemented")
        if self.aux_loss_form not in ("sequence", "batch"):
            raise ValueError(f"aux_loss_form={self.aux_loss_form!r}: choose 'sequence' (MiniMind2) or 'batch' "
                             f"(minimind-3)")

    def _read_minimind3_fields(self, kwargs: dict[str, Any]) -> None:
        """A config.json written by minimind-3's own code: its MoE fields have Qwen3-MoE's names, and what its model
        hard-wires is not in the file (q/k-norm, no shared expert, its router conventions). Consumes those keys."""
        self.aux_loss_alpha = kwargs.pop("router_aux_loss_coef")
        self.n_routed_experts = kwargs.pop("num_experts", self.n_routed_experts)
        self.qk_norm, self.n_shared_experts = True, 0
        self.norm_top1_prob, self.aux_loss_form = True, "batch"
        expert_width = kwargs.pop("moe_intermediate_size", None) or self.intermediate_size  # None: the same, as there
        if expert_width != self.intermediate_size:
            raise ValueError(f"moe_intermediate_size={expert_width}: experts as wide as intermediate_size "
                             f"({self.intermediate_size}) are the only kind implemented")
        kwargs.pop("inference_rope_scaling", None)  # its effect, rope_scaling, is in the file as well

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MiniMindConfig":
        """A named size (``PRESETS``), with any field overridden, e.g. ``from_preset("minimind2", dropout=0.1)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def suffix(self) -> str:
        """The part of a checkpoint name that identifies the shape, as MiniMind names them: ``512`` or ``640_moe``."""
        return f"{self.hidden_size}_moe" if self.use_moe else str(self.hidden_size)

    def describe(self) -> str:
        """The shape as the flags a trainer takes to rebuild it: MiniMind's size flags, or ``--preset NAME`` plus the
        size flags that differ from it, whichever fits better; what no flag sets (heads, widths, ...) follows in
        parentheses."""
        sizes = dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers, use_moe=self.use_moe)
        candidates = [("", sizes, MiniMindConfig(**sizes))]  # (preset, size flags to type, the config they build)
        for name in PRESETS:
            typed = {k: v for k, v in sizes.items() if getattr(MiniMindConfig.from_preset(name), k) != v}
            candidates.append((name, typed, MiniMindConfig.from_preset(name, **typed)))

        def unmatched(config: MiniMindConfig) -> list[str]:
            return [k for k in SHAPE_FIELDS if getattr(config, k) != getattr(self, k)]

        preset, typed, closest = min(candidates, key=lambda c: len(unmatched(c[2])))  # ties: plain flags first
        desc = " ".join([f"--preset {preset}"] * bool(preset) + [f"--{k} {int(v)}" for k, v in typed.items()])
        rest = [f"{k}={getattr(self, k)}" for k in unmatched(closest)]
        return desc + (f" ({', '.join(rest)})" if rest else "")


# The fields that decide which weights a model has and how they compute (describe() names any a preset misses).
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "qk_norm", "tie_word_embeddings", "use_moe", "n_routed_experts",
                "num_experts_per_tok", "n_shared_experts")

PRESETS: dict[str, dict[str, Any]] = {
    # MiniMind2-Small, 26M
    "minimind2-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
    # MiniMind2, 104M
    "minimind2": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2),
    # MiniMind2-MoE, 145M total / ~64M active: 4 routed experts (top-2) + 1 shared
    "minimind2-moe": dict(
        hidden_size=640, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, use_moe=True,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, aux_loss_alpha=0.01,
    ),
    # minimind-3 (2026), ~64M, Qwen3 layout
    "minimind3": dict(
        hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=96,
        intermediate_size=_mlp_width(768, math.pi), rms_norm_eps=1e-6, qk_norm=True,
    ),
    # minimind-3-moe, 198M total / ~64M active: 4 routed experts, top-1 (weight 1.0), no shared expert, batch-level
    # balancing loss
    "minimind3-moe": dict(
        hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=96,
        intermediate_size=_mlp_width(768, math.pi), rms_norm_eps=1e-6, qk_norm=True, use_moe=True,
        n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0, norm_top1_prob=True, aux_loss_alpha=5e-4,
        aux_loss_form="batch",
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 sums of squares lose precision), then return to the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: MiniMindConfig) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies, and the attention factor that scales cos/sin.

    With ``rope_scaling = {"type": "yarn", ...}`` the frequencies are blended YaRN-style (Peng et al. 2023, as in
    transformers' ``_compute_yarn_parameters``): dimensions that rotate many times within the original context keep
    their frequency (extrapolation), slow ones are divided by ``factor`` (interpolation), with a linear ramp between
    ``beta_fast`` and ``beta_slow`` rotations. ``attention_factor`` defaults to ``0.1 * ln(factor) + 1``.
    """
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'yarn')")
    factor = float(scaling.get("factor", 16))
    orig_max = scaling.get("original_max_position_embeddings", 2048)
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times in orig_max tokens
        return dim * math.log(orig_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp) + inv_freq / factor * ramp
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of a batch, computed on the fly (cheap, and exact for any position)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [B, T] -> cos, sin: [B, T, head_dim]; fp32 angles (bf16 positions lose precision past 256)
        angles = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((angles, angles), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads: [B, 1, T, D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# cuDNN attention, torch's first choice on Hopper GPUs, builds a plan for every new sequence length: cheap in training,
# where shapes repeat, but a new plan for every generated token. Inference therefore uses the flash kernels. (The
# switch is a process-wide flag: generations in parallel threads may leave cuDNN off afterwards, which only costs speed.)
INFERENCE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(on_cuda: bool, training: bool) -> contextlib.AbstractContextManager:
    """The SDPA kernels to allow: torch's choice, except for inference on CUDA (the switch costs ~14 µs a call)."""
    return sdpa_kernel(INFERENCE_SDPA_BACKENDS) if on_cuda and not training else contextlib.nullcontext()


class Attention(nn.Module):
    """Grouped-query attention: ``num_key_value_heads`` K/V heads shared by groups of query heads."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.flash = config.flash_attn

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        q, k = apply_rope(q, k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # k, v now hold every position so far
        dropout = self.dropout if self.training else 0.0
        # No mask and a square score matrix: the plain causal case, which the flash kernels handle fastest.
        causal = mask is None and T > 1 and k.shape[2] == T
        if mask is None and T > 1 and not causal:
            raise ValueError("a multi-token step on top of a KV cache needs an attention mask")
        if self.flash:
            with attention_backends(q.is_cuda, self.training):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                     enable_gqa=True)
        else:
            out = self._plain_attention(q, k, v, mask, causal, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _plain_attention(self, q, k, v, mask, causal: bool, dropout: float) -> torch.Tensor:
        """softmax(q·kᵀ/√d)·v spelled out: the reference for the fused kernel, and for benchmarks."""
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = F.dropout(scores.float().softmax(-1).to(q.dtype), dropout, self.training)
        return probs @ v


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r}: only 'silu' (SwiGLU) is implemented")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Mixture of experts: a softmax router sends each token to its top-k routed experts (weighted), and every
    token also goes through the shared experts (unweighted).

    Dispatch is vectorised: the (token, expert) pairs are sorted by expert, each expert runs once on its
    contiguous slice, and the results are scattered back with ``index_add_``. The one host sync is reading the
    per-expert counts (``counts.tolist()``), which splitting into variable-size slices needs.
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.n_routed_experts
        self.renormalise = config.norm_topk_prob and (self.top_k > 1 or config.norm_top1_prob)
        self.alpha, self.aux_loss_form = config.aux_loss_alpha, config.aux_loss_form
        self.gate = nn.Linear(config.hidden_size, config.n_routed_experts, bias=False)  # the router
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_routed_experts))
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities [N, E], chosen experts [N, k] and their weights [N, k] for N = B·T tokens."""
        probs = self.gate(x.reshape(-1, x.shape[-1])).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1, sorted=False)
        if self.renormalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return probs, experts, weights

    def aux_loss(self, probs: torch.Tensor, experts: torch.Tensor, batch: int) -> torch.Tensor:
        """Load-balancing loss α · Σ_e load_e · P_e, where P_e is the mean router probability of expert e and load_e
        the routing slots e got (count_e), scaled:
          "sequence" (MiniMind2): per sequence of T tokens, load_e = count_e / (T·k / E) (uniform routing: 1);
                                  the mean over sequences. Uniform routing gives α.
          "batch" (minimind-3):   over all N tokens of the batch, load_e = E · count_e / N (uniform routing: k).
                                  Uniform routing gives k·α.
        For top-1 and one sequence the two agree."""
        if self.aux_loss_form == "sequence":
            probs, experts = probs.view(batch, -1, self.n_experts), experts.view(batch, -1)
            per_slot = self.n_experts / experts.shape[1]
        else:
            probs, experts = probs.unsqueeze(0), experts.view(1, -1)
            per_slot = self.n_experts / probs.shape[1]
        counts = torch.zeros(probs.shape[0], self.n_experts, device=probs.device)
        counts.scatter_add_(1, experts, torch.ones_like(experts, dtype=counts.dtype))
        return (counts * per_slot * probs.mean(dim=1)).sum(dim=1).mean() * self.alpha

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        probs, experts, weights = self.route(x)
        # Sort the N·k (token, expert) slots by expert so each expert sees one contiguous block of tokens.
        slot_expert = experts.flatten()
        order = slot_expert.argsort(stable=True)
        slot_token = order // self.top_k
        counts = torch.bincount(slot_expert, minlength=self.n_experts).tolist()  # host sync: split sizes
        outputs = [
            expert(chunk) for expert, chunk in zip(self.experts, flat[slot_token].split(counts)) if chunk.shape[0]
        ]
        routed = torch.cat(outputs) * weights.flatten()[order, None].to(x.dtype)
        y = torch.zeros_like(flat).index_add_(0, slot_token, routed.to(flat.dtype))
        for shared in self.shared_experts:
            y = y + shared(flat)
        aux = self.aux_loss(probs, experts, B) if self.training and self.alpha > 0 else flat.new_zeros(())
        return y.view(B, T, H), aux


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        out = self.mlp(self.post_attention_layernorm(x))
        out, aux = out if isinstance(out, tuple) else (out, None)
        return x + self.resid_dropout(out), aux


# ----------------------------------------------------------------------------------------------------------------------
# The model


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # normal(0, initializer_range) for Linear/Embedding, ones for RMSNorm
        if isinstance(module, RotaryEmbedding):  # buffers are not in checkpoints: rebuild after meta-device loading
            inv_freq, module.attention_factor = rope_inv_freq(module.config)
            with torch.no_grad():
                module.inv_freq.copy_(inv_freq)


class MiniMindModel(MiniMindPreTrainedModel):
    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Cache | None, torch.Tensor | None]:
        B, T = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0  # a 0-d tensor for static caches
        if position_ids is not None and attention_mask is None and past_key_values is None and T > 1:
            # packed rows with positions restarting at each document: attend within the document only
            attention_mask = _document_mask(position_ids)
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:  # left padding: count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = (torch.arange(T, device=input_ids.device) + past).unsqueeze(0)
        static = past_key_values is not None and past_key_values.is_compileable  # preallocated: keys span the buffer
        kv_len = past_key_values.get_mask_sizes(T, 0)[0] if static else past + T
        mask = _attention_mask(attention_mask, past, T, kv_len, input_ids.device, static)
        h = self.dropout(self.embed_tokens(input_ids))
        rope = self.rotary_emb(position_ids, h.dtype)
        aux_total = None
        for layer in self.layers:
            h, aux = layer(h, rope, mask, past_key_values)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return self.norm(h), past_key_values, aux_total


def _document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] causal mask that keeps each document of a packed row to itself; a document starts where its
    position restarts at 0 (the convention transformers uses for packed sequences)."""
    doc = (position_ids == 0).cumsum(-1)  # [B, T]: which document each token belongs to
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def _attention_mask(attention_mask: torch.Tensor | None, past: int | torch.Tensor, T: int, kv_len: int,
                    device: torch.device, static: bool) -> torch.Tensor | None:
    """The boolean [B, 1, T, kv_len] mask (True = may attend) for T new queries after ``past`` cached positions.

    None means "plain causal" (or "attend to everything" for a single query), which lets SDPA pick its fastest
    kernel. A [B, K] padding mask is combined with causality; a static cache's unwritten slots are hidden by
    causality too. Rows that may attend to nothing (left padding at the start of a row) are opened up: their
    outputs are never used, and SDPA would return NaN for them otherwise. A 4-D mask is used as given.
    """
    if attention_mask is not None and attention_mask.ndim == 4:
        return attention_mask
    if attention_mask is None and not static and (past == 0 or T == 1):
        return None
    query_pos = past + torch.arange(T, device=device)
    mask = (torch.arange(kv_len, device=device) <= query_pos[:, None])[None, None]
    if attention_mask is not None:
        keys_ok = F.pad(attention_mask.bool(), (0, kv_len - attention_mask.shape[-1]), value=True)
        mask = mask & keys_ok[:, None, None, :]
    return mask | ~mask.any(dim=-1, keepdim=True)


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        """``labels`` are the input ids themselves (shifted here), with IGNORE_INDEX (-100) where no loss is wanted.

        ``loss`` is the mean next-token cross entropy plus, for MoE in training mode, the router's
        load-balancing loss (also returned alone as ``aux_loss``). ``logits_to_keep=n`` computes logits for the
        last n positions only (generation needs just the last one).
        """
        hidden, cache, aux_loss = self.model(
            input_ids, attention_mask, position_ids, past_key_values, bool(use_cache) if use_cache is not None else False
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            targets = labels[:, 1:].reshape(-1)
            loss_sum = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX,
                reduction="sum"
            )
            # mean over supervised tokens; a batch with none (all ignored) gives 0, not NaN, and needs no host sync
            loss = loss_sum / (targets != IGNORE_INDEX).sum().clamp(min=1)
            if aux_loss is not None:
                loss = loss + aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits, past_key_values=cache)

    def count_parameters(self) -> tuple[int, int]:
        """(total, active per token): they differ for MoE, where a token uses top-k of the routed experts."""
        total = sum(p.numel() for p in self.parameters())  # a tied embedding/head is counted once
        active = total
        if self.config.use_moe:
            per_expert = sum(p.numel() for p in self.model.layers[0].mlp.experts[0].parameters())
            idle = self.config.n_routed_experts - self.config.num_experts_per_tok
            active -= idle * per_expert * self.config.num_hidden_layers
        return total, active

    def params_summary(self) -> str:
        """``Params: 25.83M`` or, for MoE, ``Params: 145.07M-A63.44M`` (total-Active), as MiniMind reports."""
        total, active = self.count_parameters()
        return f"Params: {total / 1e6:.2f}M" + (f"-A{active / 1e6:.2f}M" if active != total else "")


AutoConfig.register("minimind", MiniMindConfig)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM)
