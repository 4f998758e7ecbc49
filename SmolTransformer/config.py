"""SmolTransformer's configuration: the defaults of docs/MODELS.md (~153M parameters) and the presets."""
from dataclasses import dataclass
from typing import Literal

from smolhub.config import ModelConfig, option
from smolhub.errors import UserError


@dataclass
class SmolTransformerConfig(ModelConfig):
    block_size: int = option(1024, "Context length in tokens; also the number of positions, so longer inputs "
                             "are refused (generation predicts from the last block_size tokens).")
    positions: Literal["learned", "sinusoidal"] = option(
        "learned", "Absolute positions added to the token embeddings: learned (GPT-2: a trained table of "
        "block_size rows) or sinusoidal (the fixed sin/cos of Vaswani et al., 2017: no parameters).")
    n_layer: int = option(16, "Number of transformer blocks.")
    n_embd: int = option(768, "Model width (d_model).")
    n_head: int = option(12, "Attention heads (multi-head: every head has its own keys and values).")
    ffn_hidden: int = option(3072, "Hidden width of the GELU feed-forward (4 x n_embd in GPT-2).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ffn_hidden <= 0:
            raise UserError(f"--ffn_hidden must be positive, got {self.ffn_hidden}")
        if self.positions not in ("learned", "sinusoidal"):
            raise UserError(f"--positions must be learned or sinusoidal, got {self.positions!r}")


# What the trainer uses unless told otherwise; presets, --config and flags override it. The default run
# is compute-sensible for ~153M parameters on web text: ~20 tokens a parameter (Chinchilla), 6,000 steps
# of nanoGPT's 524,288 tokens (3.1B), warmup 2.5% of the steps, cosine to lr/10, the micro-batch that fits.
TRAIN_DEFAULTS = dict(dataset="fineweb-edu", tokenizer="gpt2", tokens_per_step=524288, max_steps=6000, warmup_steps=150,
                      lr=6e-4, min_lr=6e-5, schedule="cosine", batch_size="auto")

# Presets set model and training fields together; flags given on the command line win.
PRESETS = {
    "tiny": dict(block_size=128, n_layer=2, n_embd=128, n_head=4, ffn_hidden=512, tokenizer="bpe", bpe_vocab_size=512,
                 batch_size=16, tokens_per_step=0, max_steps=200, lr=3e-3, min_lr=3e-4, warmup_steps=20,
                 eval_interval=50, eval_batches=8, log_interval=10, sample_interval=100, save_interval=100,
                 compile="false", wandb_mode="disabled"),
}
