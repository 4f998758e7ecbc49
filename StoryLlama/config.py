"""StoryLlama's configuration: the defaults of docs/MODELS.md (~89M parameters) and the presets."""
from dataclasses import dataclass

from smolhub.config import ModelConfig, check_kv_heads, check_rope, option
from smolhub.errors import UserError


@dataclass
class StoryLlamaConfig(ModelConfig):
    block_size: int = option(512, "Context length in tokens.")
    n_layer: int = option(8, "Number of transformer blocks.")
    n_embd: int = option(768, "Model width (d_model).")
    n_head: int = option(12, "Query heads.")
    n_kv_heads: int = option(4, "Key/value heads: n_head = MHA, 1 = MQA, a divisor of n_head in between = GQA.")
    ffn_hidden: int = option(2048, "Hidden width of the SwiGLU feed-forward.")
    rope_theta: float = option(10000.0, "RoPE base frequency.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kv_heads(self)
        check_rope(self)
        if self.ffn_hidden <= 0:
            raise UserError(f"--ffn_hidden must be positive, got {self.ffn_hidden}")


# What the trainer uses unless told otherwise; presets, --config and flags override it. The default run
# is one pass over TinyStories (~470M GPT-2 tokens, ~2.1M stories) and a little more: 4,000 steps of
# 131,072 tokens (524M), warmup 2.5% of the steps, cosine to lr/10, the micro-batch that fits the GPU.
TRAIN_DEFAULTS = dict(dataset="tinystories", tokenizer="gpt2", tokens_per_step=131072, max_steps=4000, warmup_steps=100,
                      lr=1e-3, min_lr=1e-4, schedule="cosine", batch_size="auto")

# Presets set model and training fields together; flags given on the command line win.
PRESETS = {
    "tiny": dict(block_size=128, n_layer=2, n_embd=128, n_head=4, n_kv_heads=2, ffn_hidden=256, tokenizer="bpe",
                 bpe_vocab_size=512, batch_size=16, tokens_per_step=0, max_steps=200, lr=3e-3, min_lr=3e-4,
                 warmup_steps=20, eval_interval=50, eval_batches=8, log_interval=10, sample_interval=100,
                 save_interval=100, compile="false", wandb_mode="disabled"),
}
