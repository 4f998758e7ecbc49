"""SmolMixtral's tokenizer: a byte-level BPE of 32000 tokens trained on the training corpus.

The trainer trains it on the first run (`--bpe_vocab_size` sets the size; the `tiny` preset uses
512) and caches it in `--data_dir`; checkpoints carry it, and `load_tokenizer(checkpoint_folder)`
reads it back. `--tokenizer gpt2` or a tokenizer folder replace it.
"""
from smolhub.tokenizer import load_tokenizer, train_bpe

DEFAULT_TOKENIZER = "bpe"

__all__ = ["DEFAULT_TOKENIZER", "load_tokenizer", "train_bpe"]
