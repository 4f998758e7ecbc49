"""Building blocks shared by the five models."""
from smolhub.layers.attention import (CausalSelfAttention, KVCache, SlidingWindowKVCache, attend, causal_mask,
                                     write_rows)
from smolhub.layers.feedforward import GeluMLP, SwiGLU
from smolhub.layers.masks import DocumentMask, document_mask, document_positions
from smolhub.layers.moe import (
    GroupedExperts,
    MoEFeedForward,
    NoisyTopKRouter,
    SoftmaxTopKRouter,
    expert_counts,
    inactive_expert_params,
    moe_aux_loss,
    moe_metrics,
    top_k_indices,
)
from smolhub.layers.norms import LayerNorm, RMSNorm
from smolhub.layers.positions import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    apply_rotary,
    per_row,
    token_positions,
)

__all__ = [
    "CausalSelfAttention", "KVCache", "attend", "causal_mask", "write_rows", "per_row",
    "token_positions", "GeluMLP", "SwiGLU", "LayerNorm", "RMSNorm",
    "SlidingWindowKVCache", "DocumentMask", "document_mask", "document_positions",
    "LearnedPositionalEmbedding", "RotaryEmbedding", "SinusoidalPositionalEmbedding", "apply_rotary",
    "GroupedExperts", "MoEFeedForward", "NoisyTopKRouter", "SoftmaxTopKRouter", "moe_aux_loss", "moe_metrics",
    "expert_counts", "inactive_expert_params", "top_k_indices",
]
