"""FLOPs per token and GPU peak throughput, for MFU (model FLOPs utilisation).

MFU = flops_per_token · tokens/s ÷ peak FLOP/s, with flops_per_token = 6·N + 12·L·d·T (PaLM appendix B): N the
non-embedding parameters a token passes through (for MoE the active ones), L layers, d the attention width
(heads × head_dim), T the sequence length. Forward + backward = 3 × forward = 6 FLOPs per parameter per token.
"""

from __future__ import annotations

import torch

from model.model_minimind import MiniMindConfig

# Dense bf16 tensor-core peaks, TFLOP/s (no sparsity). Unknown GPU -> None -> MFU is not shown rather than wrong.
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A6000": 155.0,
    "RTX 4090": 165.0, "RTX 4080": 97.0, "RTX 3090": 71.0, "RTX 3080": 59.5, "A10": 125.0, "L4": 121.0, "T4": 65.0,
}


def non_embedding_params(config: MiniMindConfig, active: bool = True) -> int:
    """Parameters in the transformer blocks (the tied embedding/head is excluded: its matmul is counted below)."""
    d, hd = config.hidden_size, config.head_dim
    attn = d * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * d * config.intermediate_size
    if config.use_moe:
        routed = config.num_experts_per_tok if active else config.n_routed_experts
        mlp = mlp * (routed + config.n_shared_experts) + d * config.n_routed_experts
    return config.num_hidden_layers * (attn + mlp)


def flops_per_token(config: MiniMindConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (blocks + LM head) + 12·L·d·T (attention scores and values)."""
    n = non_embedding_params(config) + config.hidden_size * config.vocab_size  # the LM head matmul is real work
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * n + attention


def peak_tflops(device: torch.device | str, override: float | None = None) -> float | None:
    """The bf16 peak of the CUDA GPU at ``device``, from its name; None where unknown (CPU, MPS, other GPUs)."""
    if override:
        return override
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None
