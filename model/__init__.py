"""MiniMind models: the transformer (model_minimind), LoRA (model_lora) and the one way to load them (loading)."""

from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM

__all__ = ["PRESETS", "MiniMindConfig", "MiniMindForCausalLM"]
