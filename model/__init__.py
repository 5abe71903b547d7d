"""MiniMind models: the transformer (model_minimind), LoRA (model_lora) and the one way to load them (loading), which
builds on files (paths, atomic writes), weights (state dicts), checkpoint_config, hf_interop and devices."""

from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM

__all__ = ["PRESETS", "MiniMindConfig", "MiniMindForCausalLM"]
