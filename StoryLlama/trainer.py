"""Train StoryLlama: `python trainer.py [--preset tiny] [--flags]`, or under torchrun for DDP.

Every field of StoryLlamaConfig and TrainConfig is a flag; `python trainer.py --help` lists them.
Its defaults (dataset, tokenizer, ...) are TRAIN_DEFAULTS and PRESETS in config.py.
"""
from smolhub.cli import run_main
from smolhub.train import main as train_main
from StoryLlama.model import StoryLlama


def main(argv: list[str] | None = None) -> dict:
    return train_main(StoryLlama, argv)


if __name__ == "__main__":
    run_main(main)
