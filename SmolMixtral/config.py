"""SmolMixtral's configuration: the defaults of docs/MODELS.md (~125M parameters, ~50M active) and presets."""
from dataclasses import dataclass

from smolhub.config import MoEConfig, check_rope, option


@dataclass
class SmolMixtralConfig(MoEConfig):
    block_size: int = option(1024, "Context length in tokens.")
    n_layer: int = option(8, "Number of transformer blocks.")
    n_embd: int = option(512, "Model width (d_model).")
    n_head: int = option(8, "Attention heads (multi-head attention: as many key/value heads).")
    rope_theta: float = option(10000.0, "RoPE base frequency.")
    noisy_routing: bool = option(True, "Noisy top-k gating in training: learned Gaussian noise on the router "
                                 "logits (Shazeer et al., 2017); evaluation routes on the clean logits.",
                                 off="Route on the clean router logits in training too (no noise parameters).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rope(self)


# What the trainer uses unless told otherwise; presets, --config and flags override it. The default run
# is one pass over TinyStories (~470M GPT-2 tokens, ~2.1M stories) and a little more: 4,000 steps of
# 131,072 tokens (524M), warmup 2.5% of the steps, cosine to lr/10, the micro-batch that fits the GPU.
TRAIN_DEFAULTS = dict(dataset="tinystories", tokenizer="bpe", tokens_per_step=131072, max_steps=4000, warmup_steps=100,
                      lr=1e-3, min_lr=1e-4, schedule="cosine", batch_size="auto")

# Presets set model and training fields together; flags given on the command line win.
PRESETS = {
    "tiny": dict(block_size=128, n_layer=2, n_embd=128, n_head=4, n_experts=8, expert_hidden=64, tokenizer="bpe",
                 bpe_vocab_size=512, batch_size=16, tokens_per_step=0, max_steps=200, lr=3e-3, min_lr=3e-4,
                 warmup_steps=20, eval_interval=50, eval_batches=8, log_interval=10, sample_interval=100,
                 save_interval=100, compile="false", wandb_mode="disabled"),
}
