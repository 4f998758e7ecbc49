"""StoryMixtral's configuration: the defaults of MODELS.md (~202M parameters, ~70M active) and presets."""
from dataclasses import dataclass

from smolhub.config import ModelConfig, option
from smolhub.errors import UserError


@dataclass
class StoryMixtralConfig(ModelConfig):
    block_size: int = option(1024, "Context length in tokens.")
    n_layer: int = option(14, "Number of transformer blocks.")
    n_embd: int = option(512, "Model width (d_model).")
    n_head: int = option(8, "Query heads.")
    n_kv_heads: int = option(2, "Key/value heads: n_head = MHA, 1 = MQA, a divisor of n_head in between = GQA.")
    sliding_window: int = option(512, "Each token attends to the last sliding_window positions (itself "
                                 "included); the KV cache keeps only that many. 0 = full causal attention.")
    rope_theta: float = option(1e6, "RoPE base frequency.")
    n_experts: int = option(8, "SwiGLU experts per MoE layer.")
    top_k: int = option(2, "Experts each token is routed to.")
    expert_hidden: int = option(1024, "Hidden width of each SwiGLU expert.")
    aux_loss_weight: float = option(0.01, "Weight of the Switch load-balancing loss (1 when balanced, "
                                    "n_experts / top_k when collapsed), averaged over layers.")
    router_z_loss_weight: float = option(0.001, "Weight of the router z-loss mean(logsumexp(logits)^2) "
                                         "(ST-MoE), averaged over layers; 0 = off.")
    capacity_factor: float = option(0.0, "Drop the lowest-weighted assignments beyond capacity_factor x "
                                    "tokens x top_k / n_experts per expert; 0 = drop nothing.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_kv_heads <= 0 or self.n_head % self.n_kv_heads:
            raise UserError(f"--n_head {self.n_head} must be divisible by --n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise UserError(f"RoPE needs an even head dimension; n_embd/n_head = {self.head_dim}")
        if self.sliding_window < 0:
            raise UserError(f"--sliding_window must be >= 0 (0 = full attention), got {self.sliding_window}")
        if self.n_experts <= 0 or self.expert_hidden <= 0:
            raise UserError(f"--n_experts and --expert_hidden must be positive, got {self.n_experts} "
                            f"and {self.expert_hidden}")
        if not 1 <= self.top_k <= self.n_experts:
            raise UserError(f"--top_k {self.top_k} must be between 1 and --n_experts {self.n_experts}")
        for name in ["aux_loss_weight", "router_z_loss_weight", "capacity_factor"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")


# Presets set model and training fields together; flags given on the command line win. The tiny
# window (32 of 128 positions) keeps the sliding window in play during the smoke runs.
PRESETS = {
    "tiny": dict(block_size=128, n_layer=2, n_embd=128, n_head=4, n_kv_heads=2, sliding_window=32, n_experts=8,
                 expert_hidden=64, tokenizer="bpe", bpe_vocab_size=512, batch_size=16, max_steps=200, lr=3e-3,
                 min_lr=3e-4, warmup_steps=20, eval_interval=50, eval_batches=8, log_interval=10,
                 sample_interval=100, save_interval=100, compile="false", wandb_mode="disabled"),
}
