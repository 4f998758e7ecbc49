"""Building blocks shared by the five models."""
from smolhub.layers.attention import CausalSelfAttention, KVCache, attend, causal_mask
from smolhub.layers.feedforward import GeluMLP, SwiGLU
from smolhub.layers.norms import LayerNorm, RMSNorm
from smolhub.layers.positions import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    apply_rotary,
)

__all__ = [
    "CausalSelfAttention", "KVCache", "attend", "causal_mask", "GeluMLP", "SwiGLU", "LayerNorm", "RMSNorm",
    "LearnedPositionalEmbedding", "RotaryEmbedding", "SinusoidalPositionalEmbedding", "apply_rotary",
]
