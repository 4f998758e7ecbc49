"""Train StoryLlama: `python trainer.py [--preset tiny] [--flags]`, or under torchrun for DDP.

Every field of StoryLlamaConfig and TrainConfig is a flag; `python trainer.py --help` lists them.
"""
from smolhub.cli import run_main
from smolhub.train import main as train_main
from StoryLlama.config import PRESETS
from StoryLlama.model import StoryLlama
from StoryLlama.tokenizer import DEFAULT_TOKENIZER


def main(argv: list[str] | None = None) -> dict:
    return train_main(StoryLlama, PRESETS, DEFAULT_TOKENIZER, argv, defaults={"dataset": "tinystories"})


if __name__ == "__main__":
    run_main(main)
