"""StoryMixtral's configuration: the defaults of docs/MODELS.md (~202M parameters, ~70M active) and presets."""
from dataclasses import dataclass

from smolhub.config import MoEConfig, check_kv_heads, check_rope, option
from smolhub.errors import UserError


@dataclass
class StoryMixtralConfig(MoEConfig):
    block_size: int = option(1024, "Context length in tokens.")
    n_layer: int = option(14, "Number of transformer blocks.")
    n_embd: int = option(512, "Model width (d_model).")
    n_head: int = option(8, "Query heads.")
    n_kv_heads: int = option(2, "Key/value heads: n_head = MHA, 1 = MQA, a divisor of n_head in between = GQA.")
    sliding_window: int = option(512, "Each token attends to the last sliding_window positions (itself "
                                 "included); the KV cache keeps only that many. 0 = full causal attention.")
    rope_theta: float = option(1e6, "RoPE base frequency.")
    router_z_loss_weight: float = option(0.001, "Weight of the router z-loss mean(logsumexp(logits)^2) "
                                         "(ST-MoE), averaged over layers; 0 = off.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kv_heads(self)
        check_rope(self)
        if self.sliding_window < 0:
            raise UserError(f"--sliding_window must be >= 0 (0 = full attention), got {self.sliding_window}")


# What the trainer uses unless told otherwise; presets, --config and flags override it. The default run
# is one pass over TinyStories (~470M GPT-2 tokens, ~2.1M stories) and a little more: 4,000 steps of
# 131,072 tokens (524M), warmup 2.5% of the steps, cosine to lr/10, the micro-batch that fits the GPU.
# lr 5e-4: it tied 1e-3 and beat 2e-3 in benchmarks/studies/lr_sweep_StoryMixtral.yaml (README, "Default runs").
TRAIN_DEFAULTS = dict(dataset="tinystories", tokenizer="bpe", tokens_per_step=131072, max_steps=4000, warmup_steps=100,
                      lr=5e-4, min_lr=5e-5, schedule="cosine", batch_size="auto")

# Presets set model and training fields together; flags given on the command line win. The tiny
# window (32 of 128 positions) keeps the sliding window in play during the smoke runs.
PRESETS = {
    "tiny": dict(block_size=128, n_layer=2, n_embd=128, n_head=4, n_kv_heads=2, sliding_window=32, n_experts=8,
                 expert_hidden=64, tokenizer="bpe", bpe_vocab_size=512, batch_size=16, tokens_per_step=0, max_steps=200,
                 lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_interval=50, eval_batches=8, log_interval=10,
                 sample_interval=100, save_interval=100, compile="false", wandb_mode="disabled"),
}
