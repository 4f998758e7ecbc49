"""Model pairs for the GPU benchmarks: each SmolHub model at its default size and the transformers
model of the same shape that a user would pick instead."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from smolhub.modeling import model_class


def ours(name: str, vocab_size: int, **overrides) -> Callable[[], torch.nn.Module]:
    def build():
        cls = model_class(name)
        return cls(cls.config_class(vocab_size=vocab_size, **overrides))
    return build


def hf_llama_like(cfg) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.block_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True, attn_implementation="sdpa"))


def hf_gpt2_like(cfg) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, tie_word_embeddings=True, attn_implementation="sdpa"))


@dataclass
class Pair:
    name: str
    seq_len: int
    build_ours: Callable[[], torch.nn.Module]
    build_baseline: Callable[[torch.nn.Module], torch.nn.Module] | None
    baseline_name: str


def pairs() -> dict[str, Pair]:
    return {
        "StoryLlama": Pair("StoryLlama", 512, ours("StoryLlama", 50304), hf_llama_like, "HF LlamaForCausalLM"),
    }


def median_ms(times: list[float]) -> float:
    return statistics.median(times)


def cuda_timer():
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    return start, end
