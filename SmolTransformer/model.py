"""SmolTransformer: the classic GPT decoder (Radford et al., 2019) with RMSNorm.

Token and absolute position embeddings are added (learned, as in GPT-2, or the fixed sinusoids of
the original Transformer: config.positions), then each block is pre-norm:
x + Attention(RMSNorm(x)), then x + MLP(RMSNorm(x)), with multi-head attention (every head its
own keys and values, no rotary positions) and a GELU MLP four times as wide as the model. A final
RMSNorm precedes the output head, which shares the token embedding. No biases anywhere.

Either way the positions are a table of block_size rows, so the model has no notion of a position
beyond it: a longer input raises an error, and generation predicts from the last block_size tokens.
"""
import torch
import torch.nn as nn

from smolhub.layers import (CausalSelfAttention, DocumentMask, GeluMLP, KVCache, LearnedPositionalEmbedding, RMSNorm,
                            SinusoidalPositionalEmbedding, document_mask)
from smolhub.modeling import CausalLM
from SmolTransformer.config import SmolTransformerConfig


class Block(nn.Module):
    def __init__(self, config: SmolTransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, dropout=config.dropout)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GeluMLP(config.n_embd, config.ffn_hidden, dropout=config.dropout)

    def forward(self, x, kv_cache: KVCache | None = None, start_pos: int | torch.Tensor = 0,
                documents: DocumentMask | None = None):
        x = x + self.attn(self.attn_norm(x), None, kv_cache, start_pos, documents)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class SmolTransformer(CausalLM):
    config_class = SmolTransformerConfig

    def __init__(self, config: SmolTransformerConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        positions = LearnedPositionalEmbedding if config.positions == "learned" else SinusoidalPositionalEmbedding
        self.pos_emb = positions(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: list[KVCache] | None = None, start_pos: int | torch.Tensor = 0,
                document_ids: torch.Tensor | None = None):
        documents = document_mask(document_ids, kv_cache)
        pos = self.pos_emb(start_pos, idx.size(1)) if documents is None else self.pos_emb.at(documents.positions)
        x = self.drop(self.residual_stream(self.tok_emb(idx) + pos))
        for i, block in enumerate(self.blocks):
            x = self.run_block(block, x, kv_cache[i] if kv_cache else None, start_pos, documents)
        return self.logits_and_loss(self.norm(x), targets)
