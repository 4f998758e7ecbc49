"""StoryMixtral: the Mixtral architecture (Jiang et al., 2024) at story-model scale.

Each block is pre-norm: x + Attention(RMSNorm(x)), then x + MoE(RMSNorm(x)). Attention is
grouped-query (8 query heads share 2 key/value heads) with rotary positions (theta 1e6) and a
sliding window: each token sees the last `sliding_window` positions, so the KV cache stays that
size at decode time. The MoE layer routes each token to 2 of 8 SwiGLU experts (softmax, top-2,
renormalised); a Switch load-balancing loss and the ST-MoE router z-loss join the training loss.
The output head shares the token embedding.
"""
import torch
import torch.nn as nn

from smolhub.layers import (CausalSelfAttention, DocumentMask, GroupedExperts, KVCache, MoEFeedForward, RMSNorm,
                            RotaryEmbedding, SlidingWindowKVCache, SoftmaxTopKRouter, document_mask,
                            inactive_expert_params, moe_aux_loss, moe_metrics)
from smolhub.modeling import CausalLM
from StoryMixtral.config import StoryMixtralConfig


class Block(nn.Module):
    def __init__(self, config: StoryMixtralConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.n_kv_heads, dropout=config.dropout,
                                        window=config.sliding_window or None)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.moe = MoEFeedForward(SoftmaxTopKRouter(config.n_embd, config.n_experts, config.top_k),
                                  GroupedExperts(config.n_experts, config.n_embd, config.expert_hidden,
                                                 config.experts_kernel),
                                  config.capacity_factor, config.dropout)

    def forward(self, x, rope, kv_cache: KVCache | SlidingWindowKVCache | None = None,
                start_pos: int | torch.Tensor = 0, documents: DocumentMask | None = None):
        x = x + self.attn(self.attn_norm(x), rope, kv_cache, start_pos, documents)
        x = x + self.moe(self.ffn_norm(x))
        return x


class StoryMixtral(CausalLM):
    config_class = StoryMixtralConfig

    def __init__(self, config: StoryMixtralConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.rope = RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: list[KVCache | SlidingWindowKVCache] | None = None, start_pos: int | torch.Tensor = 0,
                document_ids: torch.Tensor | None = None):
        documents = document_mask(document_ids, kv_cache, self.config.sliding_window or None)
        x = self.residual_stream(self.tok_emb(idx))
        rope = self.rope(start_pos, idx.size(1)) if documents is None else self.rope.at(documents.positions)
        for i, block in enumerate(self.blocks):
            x = self.run_block(block, x, rope, kv_cache[i] if kv_cache else None, start_pos, documents)
        return self.logits_and_loss(self.norm(x), targets)

    def aux_loss(self) -> torch.Tensor | None:
        return moe_aux_loss(self, self.config.aux_loss_weight, self.config.router_z_loss_weight)

    def train_metrics(self) -> dict:
        return moe_metrics(self)

    def num_active_params(self) -> int:
        return self.num_params() - inactive_expert_params(self)
