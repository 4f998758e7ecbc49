"""SmolTransformer and SmolMixtral as transformers models (trust_remote_code=True).

transformers has no class for these two: SmolTransformer is GPT-2 with RMSNorm and no biases,
SmolMixtral a Mixtral with LayerNorm and multi-head attention. This file is copied into their
exported folders and must stay self-contained (torch and transformers only). Parameter names are
SmolHub's, so an export's weights are the checkpoint's tensors under the same keys.

    tokens -> embedding (+ absolute positions) -> n_layer x [x + Attn(Norm(x)); x + FFN(Norm(x))] -> Norm -> head
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_smolhub import SmolHubConfig

CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


def make_norm(config: SmolHubConfig) -> nn.Module:
    return RMSNorm(config.n_embd, config.norm_eps) if config.norm == "rmsnorm" else LayerNorm(config.n_embd,
                                                                                              config.norm_eps)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    """Multi-head causal attention with one fused q|k|v projection and optional rotate-half RoPE."""

    def __init__(self, config: SmolHubConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.head_dim = layer_idx, config.n_head, config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.out = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, rope, mask, cache):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
        if rope is not None:
            cos, sin = rope
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class GeluMLP(nn.Module):
    def __init__(self, config: SmolHubConfig):
        super().__init__()
        self.up = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Router(nn.Module):
    """Softmax over the experts, top-k, renormalised. `noise` is the training-only noisy-gating
    projection of the checkpoint: kept so the weights load, never used for inference."""

    def __init__(self, config: SmolHubConfig, noisy: bool):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        if noisy:
            self.noise = nn.Linear(config.n_embd, config.n_experts, bias=False)

    def forward(self, x):
        probs = F.linear(x.float(), self.gate.weight.float()).softmax(dim=-1)
        weights, idx = probs.topk(self.top_k, dim=-1)
        return idx, weights / weights.sum(dim=-1, keepdim=True)


class MoE(nn.Module):
    """Each token through its top-k SwiGLU experts.

    gate_up[e] = [W_gate | W_up] is (dim, 2*hidden) and down[e] is (hidden, dim), as in SmolHub."""

    def __init__(self, config: SmolHubConfig, noisy: bool):
        super().__init__()
        self.n_experts, self.hidden = config.n_experts, config.expert_hidden
        self.router = Router(config, noisy)
        self.gate_up = nn.Parameter(torch.empty(config.n_experts, config.n_embd, 2 * config.expert_hidden))
        self.down = nn.Parameter(torch.empty(config.n_experts, config.expert_hidden, config.n_embd))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, weights = self.router(x)
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            token, slot = torch.nonzero(idx == e, as_tuple=True)
            gate, up = (x[token] @ self.gate_up[e]).split(self.hidden, dim=-1)
            y = (F.silu(gate) * up) @ self.down[e]
            out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, config: SmolHubConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = make_norm(config)
        self.ffn = GeluMLP(config) if config.ffn == "gelu" else MoE(config, noisy=config.noisy_routing)

    def forward(self, x, rope, mask, cache):
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class SmolHubPreTrainedModel(PreTrainedModel):
    config_class = SmolHubConfig
    base_model_prefix = "smolhub"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoE):
            nn.init.normal_(module.gate_up, mean=0.0, std=std)
            nn.init.normal_(module.down, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        elif isinstance(module, (RMSNorm, LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class SmolHubForCausalLM(SmolHubPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "tok_emb.weight"}

    def __init__(self, config: SmolHubConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_emb

    def set_input_embeddings(self, value):
        self.tok_emb = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def rope(self, position_ids, dtype):
        """(cos, sin), (B, 1, T, head_dim), in the rotate-half layout, computed in fp64 like SmolHub's table.

        Computed per call rather than kept in a buffer: transformers builds models on the meta device
        and would leave a non-persistent buffer uninitialised."""
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (self.config.rope_theta ** (
            torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim))
        angles = position_ids[:, None, :, None].double() * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().float().to(dtype), angles.sin().float().to(dtype)

    def sinusoids(self, position_ids, dtype):
        """The fixed sin/cos positions (B, T, n_embd) as SmolHub's table holds them (fp64, then fp32),
        computed per call for the reason rope() is."""
        dim = self.config.n_embd
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64, device=position_ids.device)
                        * (-math.log(10000.0) / dim))
        angles = position_ids[..., None].double() * div
        table = angles.new_zeros(*position_ids.shape, dim)
        table[..., 0::2] = angles.sin()
        table[..., 1::2] = angles.cos()[..., : dim // 2]
        return table.float().to(dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        """`cache` is transformers >= 5.24's name of the KV cache, `past_key_values` the earlier one."""
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        rope = None
        if self.config.positions == "rope":
            rope = self.rope(position_ids, x.dtype)
        elif int(position_ids.max()) >= self.config.block_size:
            raise ValueError(f"position {int(position_ids.max())} is beyond the model's {self.config.block_size} "
                             f"{self.config.positions} positions: shorten the prompt or max_new_tokens")
        elif self.config.positions == "sinusoidal":
            x = x + self.sinusoids(position_ids, x.dtype)
        else:
            x = x + self.pos_emb(position_ids)
        mask = self.attention_mask(attention_mask, B, T, past, x.device)
        for block in self.blocks:
            x = block(x, rope, mask, cache if use_cache else None)
        x = self.norm(x)
        logits = self.lm_head(x if not logits_to_keep else x[:, -logits_to_keep:])
        loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})

    @staticmethod
    def attention_mask(attention_mask, B, T, past, device):
        """None for a plain causal prefill; else a boolean (B, 1, T, past + T) mask: causal, without padded
        keys (each query still sees itself, so a padding row never becomes all-masked)."""
        S = past + T
        if (attention_mask is None or bool(attention_mask.all())) and T == S:
            return None
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, -S:].bool() | (k_pos == q_pos))
        return mask
