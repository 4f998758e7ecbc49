"""StoryLlama's tokenizer: GPT-2's byte-level BPE (50257 tokens, embedding padded to 50304).

The `tiny` preset trains a 512-token BPE on its corpus instead, so the offline quick start needs
no download. Checkpoints carry their tokenizer; `load_tokenizer(checkpoint_folder)` reads it back.
The trainer's default is TRAIN_DEFAULTS["tokenizer"] = "gpt2" in config.py.
"""
from smolhub.tokenizer import gpt2_tokenizer, load_tokenizer

__all__ = ["gpt2_tokenizer", "load_tokenizer"]
