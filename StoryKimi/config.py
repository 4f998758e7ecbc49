"""StoryKimi's configuration: the defaults of docs/MODELS.md (~182M parameters, ~78M active) and the presets."""
from dataclasses import dataclass

from smolhub.config import ModelConfig, experts_kernel_option, option
from smolhub.errors import UserError


@dataclass
class StoryKimiConfig(ModelConfig):
    training_fields = ModelConfig.training_fields | {"qk_clip_threshold", "bias_update_rate", "seq_aux_loss_weight",
                                                     "experts_kernel"}
    compute_fields = ModelConfig.compute_fields | {"experts_kernel"}

    block_size: int = option(512, "Context length in tokens.")
    n_layer: int = option(12, "Number of transformer blocks.")
    n_embd: int = option(512, "Model width (d_model).")
    n_head: int = option(8, "Attention heads.")
    norm_eps: float = option(1e-6, "Epsilon of the RMSNorms (DeepSeek-V3's 1e-6).")
    # multi-head latent attention (DeepSeek-V2)
    q_lora_rank: int = option(0, "Rank of the compressed query (0 = queries projected directly from the input).")
    kv_lora_rank: int = option(128, "Rank of the key/value latent: what the KV cache stores per token.")
    qk_nope_head_dim: int = option(32, "Per-head query/key dimensions without position information.")
    qk_rope_head_dim: int = option(16, "Query/key dimensions carrying RoPE; the rotary key is shared by all heads.")
    v_head_dim: int = option(32, "Per-head value dimension.")
    rope_theta: float = option(10000.0, "RoPE base frequency.")
    qk_clip_threshold: float = option(0.0, "MuonClip (Kimi K2): after each step, shrink the query/key weights of "
                                      "every head whose largest attention logit exceeded this (0 = off).")
    # DeepSeek-MoE feed-forward
    first_k_dense: int = option(1, "The first N blocks use a dense SwiGLU instead of experts.")
    ffn_hidden: int = option(2816, "Hidden width of the dense SwiGLU blocks.")
    n_routed_experts: int = option(8, "Routed experts per MoE block.")
    n_shared_experts: int = option(1, "Always-on shared experts per MoE block (0 = none).")
    expert_hidden: int = option(1024, "Hidden width of each (routed or shared) SwiGLU expert.")
    top_k: int = option(2, "Routed experts per token.")
    routed_scaling_factor: float = option(1.0, "Multiplier of the renormalised routing weights.")
    bias_update_rate: float = option(1e-3, "Aux-loss-free balancing: step of the per-expert selection bias after "
                                     "each optimizer step (0 = no balancing bias).")
    seq_aux_loss_weight: float = option(1e-4, "Weight of the sequence-wise balance loss (DeepSeek-V3 eq. 17; 0 = off).")
    experts_kernel: str = experts_kernel_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden",
                     "n_routed_experts", "expert_hidden", "top_k", "rope_theta", "routed_scaling_factor"]:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ["q_lora_rank", "first_k_dense", "n_shared_experts", "bias_update_rate", "seq_aux_loss_weight",
                     "qk_clip_threshold"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise UserError(f"RoPE needs an even --qk_rope_head_dim, got {self.qk_rope_head_dim}")
        if self.top_k > self.n_routed_experts:
            raise UserError(f"--top_k {self.top_k} exceeds --n_routed_experts {self.n_routed_experts}")
        if self.first_k_dense > self.n_layer:
            raise UserError(f"--first_k_dense {self.first_k_dense} exceeds --n_layer {self.n_layer}")


# What the trainer uses unless told otherwise; presets, --config and flags override it. The default run
# is one pass over TinyStories (~470M GPT-2 tokens, ~2.1M stories) and a little more: 4,000 steps of
# 131,072 tokens (524M), warmup 2.5% of the steps, cosine to lr/10, the micro-batch that fits the GPU.
TRAIN_DEFAULTS = dict(dataset="tinystories", tokenizer="bpe", optimizer="muon", tokens_per_step=131072, max_steps=4000,
                      warmup_steps=100, lr=2e-3, min_lr=2e-4, schedule="cosine", batch_size="auto")

# Presets set model and training fields together; flags given on the command line win.
PRESETS = {
    "tiny": dict(block_size=128, n_layer=2, n_embd=128, n_head=4, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, ffn_hidden=256, n_routed_experts=4, expert_hidden=128,
                 tokenizer="bpe", bpe_vocab_size=512, batch_size=16, tokens_per_step=0, max_steps=200, lr=3e-3,
                 min_lr=3e-4, warmup_steps=20, eval_interval=50, eval_batches=8, log_interval=10, sample_interval=100,
                 save_interval=100, compile="false", wandb_mode="disabled"),
}
