"""SmolMixtral: a compact sparse mixture-of-experts decoder after Mixtral (Jiang et al., 2024).

Each block is pre-norm: x + Attention(LayerNorm(x)), then x + MoE(LayerNorm(x)). Attention is
multi-head with rotary positions. The MoE layer replaces the dense feed-forward: a router picks 2 of
8 SwiGLU experts per token (noisy top-k gating in training, Shazeer et al., 2017) and the block adds
their outputs weighted by the renormalised router probabilities. A Switch load-balancing loss keeps
the experts evenly used. The output head shares the token embedding.
"""
import torch
import torch.nn as nn

from smolhub.layers import (CausalSelfAttention, DocumentMask, GroupedExperts, KVCache, LayerNorm, MoEFeedForward,
                            NoisyTopKRouter, RotaryEmbedding, SoftmaxTopKRouter, document_mask, inactive_expert_params,
                            moe_aux_loss, moe_metrics)
from smolhub.modeling import CausalLM
from SmolMixtral.config import SmolMixtralConfig


class Block(nn.Module):
    def __init__(self, config: SmolMixtralConfig):
        super().__init__()
        self.attn_norm = LayerNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, dropout=config.dropout)
        self.ffn_norm = LayerNorm(config.n_embd, config.norm_eps)
        router = (NoisyTopKRouter if config.noisy_routing else SoftmaxTopKRouter)(
            config.n_embd, config.n_experts, config.top_k)
        experts = GroupedExperts(config.n_experts, config.n_embd, config.expert_hidden, config.experts_kernel)
        self.moe = MoEFeedForward(router, experts, config.capacity_factor, config.dropout)

    def forward(self, x, rope, kv_cache: KVCache | None = None, start_pos: int | torch.Tensor = 0,
                documents: DocumentMask | None = None):
        x = x + self.attn(self.attn_norm(x), rope, kv_cache, start_pos, documents)
        x = x + self.moe(self.ffn_norm(x))
        return x


class SmolMixtral(CausalLM):
    config_class = SmolMixtralConfig

    def __init__(self, config: SmolMixtralConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.rope = RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = LayerNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: list[KVCache] | None = None, start_pos: int | torch.Tensor = 0,
                document_ids: torch.Tensor | None = None):
        documents = document_mask(document_ids, kv_cache)
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
