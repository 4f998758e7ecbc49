"""StoryKimi: the DeepSeek-V3 / Kimi K2 architecture at story-model scale.

Each block is pre-norm: x + MLA(RMSNorm(x)), then x + FFN(RMSNorm(x)). Attention is multi-head
latent attention (attention.py): keys and values pass through a small normed latent, which is all
the KV cache stores. The FFN is a dense SwiGLU in the first `first_k_dense` blocks and DeepSeek-MoE
(moe.py) after: sigmoid-routed experts plus a shared expert, balanced by a selection bias updated
after every optimizer step. The output head shares the token embedding. Trained with Muon on the
hidden matrices (smolhub/muon.py) and optional QK-clip.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

from smolhub.layers import DocumentMask, RMSNorm, RotaryEmbedding, SwiGLU, document_mask
from smolhub.modeling import CausalLM
from StoryKimi.attention import MLACache, MultiHeadLatentAttention
from StoryKimi.config import StoryKimiConfig
from StoryKimi.moe import DeepSeekMoE


class Block(nn.Module):
    def __init__(self, config: StoryKimiConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = MultiHeadLatentAttention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.ffn = (SwiGLU(config.n_embd, config.ffn_hidden, dropout=config.dropout) if layer < config.first_k_dense
                    else DeepSeekMoE(config))

    def forward(self, x, rope, kv_cache: MLACache | None = None, start_pos: int | torch.Tensor = 0,
                documents: DocumentMask | None = None):
        x = x + self.attn(self.attn_norm(x), rope, kv_cache, start_pos, documents)
        x = x + self.ffn(self.ffn_norm(x))
        return x


class StoryKimi(CausalLM):
    config_class = StoryKimiConfig

    def __init__(self, config: StoryKimiConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.rope = RotaryEmbedding(config.qk_rope_head_dim, config.block_size, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: list[MLACache] | None = None, start_pos: int | torch.Tensor = 0,
                document_ids: torch.Tensor | None = None):
        documents = document_mask(document_ids, kv_cache)
        x = self.residual_stream(self.tok_emb(idx))
        rope = self.rope(start_pos, idx.size(1)) if documents is None else self.rope.at(documents.positions)
        for i, block in enumerate(self.blocks):
            x = self.run_block(block, x, rope, kv_cache[i] if kv_cache else None, start_pos, documents)
        return self.logits_and_loss(self.norm(x), targets)

    @property
    def moe_layers(self) -> list[DeepSeekMoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, DeepSeekMoE)]

    # --- training hooks -----------------------------------------------------------------------
    def aux_loss(self) -> torch.Tensor | None:
        losses = [m.seq_loss for m in self.moe_layers if m.seq_loss is not None]
        return self.config.seq_aux_loss_weight * torch.stack(losses).sum() if losses else None

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Move the balancing biases by the step's token counts; QK-clip the heads whose logits ran high.

        Counts are summed and logits maxed over DDP ranks, so every rank applies the same update."""
        moes = [m for m in self.moe_layers if m.pending_load is not None]
        if moes:
            load = torch.stack([m.pending_load for m in moes]).float()
            if dist.is_initialized():
                dist.all_reduce(load)
            for m, layer_load in zip(moes, load):
                m.update_bias(layer_load, self.config.bias_update_rate)
        attns = [b.attn for b in self.blocks if b.attn.max_logit is not None]
        if attns:
            max_logit = torch.stack([a.max_logit for a in attns])
            if dist.is_initialized():
                dist.all_reduce(max_logit, op=dist.ReduceOp.MAX)
            for attn, peak in zip(attns, max_logit):
                attn.qk_clip(peak, self.config.qk_clip_threshold)
                attn.max_logit = None

    def train_metrics(self) -> dict:
        """Expert load of the last bias update: the most and least loaded expert of any layer, as a
        multiple of the even share (1 = balanced), and the largest balancing bias."""
        loads = [m.last_load for m in self.moe_layers if m.last_load is not None]
        if not loads:
            return {}
        load = torch.stack(loads)
        ratio = load / load.mean(dim=-1, keepdim=True)
        bias = torch.stack([m.router.balance_bias for m in self.moe_layers])
        return {"expert_load_max": ratio.max().item(), "expert_load_min": ratio.min().item(),
                "balance_bias_max": bias.abs().max().item()}

    # --- inference and accounting ---------------------------------------------------------------
    def make_kv_cache(self, batch_size: int, max_len: int, device, dtype) -> list[MLACache]:
        cfg = self.config
        return [MLACache(batch_size, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, device, dtype)
                for _ in range(cfg.n_layer)]

    def num_active_params(self) -> int:
        """Each token runs top_k of the routed experts (plus everything else)."""
        idle = sum(p.numel() for m in self.moe_layers for p in m.experts.parameters())
        idle = idle * (self.config.n_routed_experts - self.config.top_k) // self.config.n_routed_experts
        return self.num_params() - idle

    def flops_per_token(self, seq_len: int) -> float:
        """6 x active weights + attention scores, whose width is the heads' q/k and v dims, not n_embd."""
        cfg = self.config
        n = self.num_active_params() - self.lookup_params()
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        return 6 * n + 6 * cfg.n_layer * seq_len * cfg.n_head * (qk + v)
