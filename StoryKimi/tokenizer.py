"""StoryKimi's tokenizer: a byte-level BPE of 32000 tokens trained on the training corpus.

The trainer trains it on the first run over a dataset (`--bpe_vocab_size` changes the size) and
caches it under --data_dir; the `tiny` preset trains a 512-token one. Checkpoints carry their
tokenizer; `load_tokenizer(checkpoint_folder)` reads it back.
The trainer's default is TRAIN_DEFAULTS["tokenizer"] = "bpe" in config.py.
"""
from smolhub.tokenizer import load_tokenizer, train_bpe

__all__ = ["load_tokenizer", "train_bpe"]
