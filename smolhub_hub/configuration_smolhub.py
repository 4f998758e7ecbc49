"""Configuration of SmolHub models exported with their own modelling code (modeling_smolhub.py).

This file is copied into exported folders and must stay self-contained: it imports transformers only.
"""
from transformers import PretrainedConfig


class SmolHubConfig(PretrainedConfig):
    """A pre-norm decoder: RMSNorm or LayerNorm, absolute or rotary positions, multi-head attention
    without biases, and a GELU MLP or a mixture of SwiGLU experts; the head shares the token embedding.

    Args:
        architecture: the SmolHub model this was exported from ("SmolTransformer" or "SmolMixtral").
        vocab_size: embedding rows (the tokenizer's size padded to a multiple of 64).
        block_size: context length; also the number of absolute positions.
        n_layer, n_embd, n_head: depth, width and attention heads.
        norm: "rmsnorm" or "layernorm" (LayerNorm with bias); norm_eps its epsilon.
        positions: "learned" or "sinusoidal" (absolute, added to the token embedding) or "rope" (rotate-half RoPE).
        rope_theta: RoPE base frequency.
        ffn: "gelu" (Linear, tanh-GELU, Linear) or "moe" (num_experts_per_tok of n_experts SwiGLU experts,
            softmax router renormalised over the chosen experts).
        ffn_hidden: hidden width of the GELU MLP; expert_hidden: of each expert.
        n_experts, num_experts_per_tok: experts per layer and per token ("top_k" is a generation setting).
        noisy_routing: whether the router carries a (training-only) noise projection.
        initializer_range: std of the normal init of a model built from scratch.
        use_cache: keep keys and values between generation steps.
    """

    model_type = "smolhub"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "block_size"}

    def __init__(self, architecture="SmolTransformer", vocab_size=50304, block_size=1024, n_layer=16, n_embd=768,
                 n_head=12, norm="rmsnorm", norm_eps=1e-5, positions="learned", rope_theta=10000.0, ffn="gelu",
                 ffn_hidden=3072, n_experts=8, num_experts_per_tok=2, expert_hidden=1024, noisy_routing=False,
                 initializer_range=0.02, use_cache=True, tie_word_embeddings=True, **kwargs):
        if (norm not in ("rmsnorm", "layernorm") or positions not in ("learned", "sinusoidal", "rope")
                or ffn not in ("gelu", "moe")):
            raise ValueError(f"unsupported SmolHub config: norm={norm!r}, positions={positions!r}, ffn={ffn!r}")
        self.architecture = architecture
        self.vocab_size, self.block_size = vocab_size, block_size
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        self.norm, self.norm_eps = norm, norm_eps
        self.positions, self.rope_theta = positions, rope_theta
        self.ffn, self.ffn_hidden = ffn, ffn_hidden
        self.n_experts, self.num_experts_per_tok, self.expert_hidden = n_experts, num_experts_per_tok, expert_hidden
        self.noisy_routing, self.initializer_range, self.use_cache = noisy_routing, initializer_range, use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
