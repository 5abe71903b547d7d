"""Which device and dtype a model runs in: the best device this machine has, a clear error for one it lacks, and the
one ``--dtype auto`` policy that the trainers, the inference tools and the benchmark share."""

from __future__ import annotations

import torch


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


def resolve_dtype(device: str | torch.device, dtype: str | torch.dtype | None = "auto", *,
                  training: bool = False) -> torch.dtype:
    """``dtype`` (a torch dtype or its name, e.g. ``"bfloat16"``) as a torch dtype; ``"auto"`` or None picks one:

    - CUDA: bf16 (fp16 on GPUs without bf16; training then adds a GradScaler);
    - CPU: fp32. fp16 matmuls crawl on CPUs, and bf16 autocast measured slower for training here (26M model,
      4 x 512 tokens, a full step: 1.6 s fp32 vs 2.7 s under bf16 autocast on an AVX512-BF16 Xeon, torch 2.13);
    - MPS: fp16 for inference; fp32 for training (``training=True``, the autocast dtype), the one measured safe there.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype and dtype != "auto":
        return getattr(torch, dtype)
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if kind == "mps" and not training else torch.float32
