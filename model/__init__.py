"""MiniMind models: the transformer (model_minimind), LoRA (model_lora), the one way to load them (loading), which
builds on files (paths, atomic writes), weights (state dicts), checkpoint_config, hf_interop and devices; and the
tools a chat model may call (tools).

The names below are imported on first use (PEP 562), so ``import model.tools`` (the chat client's tools) does not
import torch; ``from model import MiniMindConfig`` imports the model."""

_EXPORTS = ("PRESETS", "MiniMindConfig", "MiniMindForCausalLM")
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from model import model_minimind

        return getattr(model_minimind, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
