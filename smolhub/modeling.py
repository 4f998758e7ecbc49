"""What every SmolHub language model shares: init, loss, parameter counts, FLOPs, KV caches.

A model subclasses `CausalLM`, builds its layers in __init__ (calling `init_weights()` last) and
writes its own forward, ending in `self.logits_and_loss(x, targets)`.

A forward with a KV cache takes `start_pos`, the position of the first token of idx (B, T): an int,
a 0-d long tensor (a CUDA-graph decode step), or a (B,) long tensor, row b's tokens at positions
start_pos[b] .. start_pos[b] + T - 1. The last lets a server decode requests of different lengths
as one batch (continuous batching): each row attends to its own cache row up to its own position,
so its logits are those of its tokens decoded alone. Positions stay below the cache's max_len and
the model's block_size.
"""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from smolhub.config import ModelConfig
from smolhub.errors import UserError
from smolhub.layers import GroupedExperts, KVCache, SlidingWindowKVCache
from smolhub.loss import linear_cross_entropy

ARCHITECTURES = ("SmolTransformer", "StoryLlama", "SmolMixtral", "StoryMixtral", "StoryKimi")


def model_class(architecture: str) -> type["CausalLM"]:
    """The model class named in a checkpoint's config.json (the model folder's name)."""
    if architecture not in ARCHITECTURES:
        raise UserError(f"unknown architecture {architecture!r}; SmolHub has {list(ARCHITECTURES)}")
    try:
        module = importlib.import_module(f"{architecture}.model")
    except ModuleNotFoundError as e:
        raise UserError(f"cannot import {architecture}.model ({e}); run `pip install -e .` in the repo root")
    return getattr(module, architecture)


def copy_cache_row(cache: list, row: int, source: list, source_row: int = 0) -> None:
    """Make row `row` of a cache (model.make_kv_cache, one object per layer) hold what row `source_row`
    of another cache of the same model and max_len holds: a request prefilled alone joins a batch.

    A cache's state is exactly the tensors in vars(cache), batch first, so copying each is the whole
    transfer; whatever the rows hold past the request's positions (an earlier request's keys) is masked."""
    for layer, src in zip(cache, source, strict=True):
        for name, tensor in vars(layer).items():
            tensor[row].copy_(getattr(src, name)[source_row])


class CausalLM(nn.Module):
    config_class: type[ModelConfig] = ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("config.vocab_size must be set (the trainer fills it from the tokenizer)")
        self.config = config

    @property
    def architecture(self) -> str:
        return type(self).__name__

    # --- construction -------------------------------------------------------------------------
    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * n_layer)
        so the residual stream's variance does not grow with depth; then tie the head."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual_init", False) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, GroupedExperts):  # stacked expert weights, not nn.Linear
                module.reset_parameters(std, 1 / math.sqrt(2 * self.config.n_layer))
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    # --- forward helpers ----------------------------------------------------------------------
    def residual_stream(self, x: torch.Tensor) -> torch.Tensor:
        """The embedded tokens in the dtype the blocks add their outputs to.

        Autocast runs the matmuls in bf16 but leaves the embedding lookup in fp32, which keeps the
        whole residual stream (every residual add and norm, and their gradients) in fp32. With
        config.bf16_residual it is cast to bf16 instead: half the memory traffic of those kernels.
        Norms still normalise in fp32 internally, and the loss is taken in fp32. Never fp16, whose
        range (up to 65504) is too narrow for a residual stream."""
        device = x.device.type
        if (self.config.bf16_residual and torch.is_autocast_enabled(device)
                and torch.get_autocast_dtype(device) == torch.bfloat16):
            return x.to(torch.bfloat16)
        return x

    def run_block(self, block: nn.Module, *args):
        """Call a block, recomputing it in backward when gradient checkpointing is on."""
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def logits_and_loss(self, x: torch.Tensor, targets: torch.Tensor | None):
        """Final hidden states -> (logits, None) for inference, or (None, mean cross-entropy) for training.

        Training never returns the logits: the head and the loss run as one step that keeps only
        their gradient (smolhub/loss.py)."""
        if targets is None:
            return self.lm_head(x), None
        return None, linear_cross_entropy(x, self.lm_head.weight, targets)

    def aux_loss(self) -> torch.Tensor | None:
        """Extra training losses collected in the last forward (MoE balancing); None for dense models."""
        return None

    def train_metrics(self) -> dict:
        """Model-specific numbers for the training log (expert load, for instance)."""
        return {}

    def after_optimizer_step(self) -> None:
        """Hook for state updated outside the gradient (aux-loss-free balancing biases, for instance)."""

    # --- inference ----------------------------------------------------------------------------
    def make_kv_cache(self, batch_size: int, max_len: int, device, dtype) -> list[KVCache | SlidingWindowKVCache]:
        """One cache per layer; a model with a `sliding_window` config field (> 0) keeps only that window."""
        cfg = self.config
        n_kv = getattr(cfg, "n_kv_heads", cfg.n_head)
        window = getattr(cfg, "sliding_window", 0)
        if 0 < window < max_len:
            return [SlidingWindowKVCache(batch_size, n_kv, window, cfg.head_dim, device, dtype)
                    for _ in range(cfg.n_layer)]
        return [KVCache(batch_size, n_kv, max_len, cfg.head_dim, device, dtype) for _ in range(cfg.n_layer)]

    # --- accounting ---------------------------------------------------------------------------
    def num_params(self) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters used per token; equal to num_params for dense models."""
        return self.num_params()

    def lookup_params(self) -> int:
        """Parameters that are only looked up, never multiplied: position tables, and the token table
        unless it is also the output head. A lookup costs no FLOPs, so MFU leaves them out, as
        nanoGPT's estimate leaves out its position table."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding)
                   and not (m is self.tok_emb and self.config.tie_embeddings))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x active weights + attention scores (PaLM appendix B / nanoGPT)."""
        cfg = self.config
        return 6 * (self.num_active_params() - self.lookup_params()) + 12 * cfg.n_layer * cfg.n_embd * seq_len
