"""SmolMixtral's tokenizer: a byte-level BPE of 32000 tokens trained on the training corpus.

The trainer trains it on the first run (`--bpe_vocab_size` sets the size; the `tiny` preset uses
512) and caches it in `--data_dir`; checkpoints carry it, and `load_tokenizer(checkpoint_folder)`
reads it back. `--tokenizer gpt2` or a tokenizer folder replace it.
The trainer's default is TRAIN_DEFAULTS["tokenizer"] = "bpe" in config.py.
"""
from smolhub.tokenizer import load_tokenizer, train_bpe

__all__ = ["load_tokenizer", "train_bpe"]
