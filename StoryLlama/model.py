"""StoryLlama: the Llama architecture (Touvron et al., 2023) at story-model scale.

Each block is pre-norm: x + Attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). Attention is
grouped-query (n_kv_heads key/value heads shared by groups of query heads) with rotary positions.
The output head shares the token embedding.
"""
import torch
import torch.nn as nn

from smolhub.layers import (CausalSelfAttention, DocumentMask, KVCache, RMSNorm, RotaryEmbedding, SwiGLU,
                            document_mask)
from smolhub.modeling import CausalLM
from StoryLlama.config import StoryLlamaConfig


class Block(nn.Module):
    def __init__(self, config: StoryLlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.n_kv_heads, dropout=config.dropout)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.ffn = SwiGLU(config.n_embd, config.ffn_hidden, dropout=config.dropout)

    def forward(self, x, rope, kv_cache: KVCache | None = None, start_pos: int | torch.Tensor = 0,
                documents: DocumentMask | None = None):
        x = x + self.attn(self.attn_norm(x), rope, kv_cache, start_pos, documents)
        x = x + self.ffn(self.ffn_norm(x))
        return x


class StoryLlama(CausalLM):
    config_class = StoryLlamaConfig

    def __init__(self, config: StoryLlamaConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.rope = RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
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
