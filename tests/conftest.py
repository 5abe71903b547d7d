"""Shared fixtures: tiny model configs (CPU, milliseconds) and an offline, quiet environment."""

import os

import pytest
import torch

os.environ.setdefault("SWANLAB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from model import MiniMindConfig  # noqa: E402

TINY = dict(vocab_size=6400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=512)


def tiny_config(**overrides) -> MiniMindConfig:
    """A 2-layer, 64-wide model: the shape of MiniMind2 at a size every test can afford."""
    return MiniMindConfig(**{**TINY, **overrides})


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
