"""Train StoryMixtral: `python trainer.py [--preset tiny] [--flags]`, or under torchrun for DDP.

Every field of StoryMixtralConfig and TrainConfig is a flag; `python trainer.py --help` lists them.
The balancing losses join the training loss; metrics.jsonl logs them and the expert load.
"""
from smolhub.cli import run_main
from smolhub.train import main as train_main
from StoryMixtral.config import PRESETS
from StoryMixtral.model import StoryMixtral
from StoryMixtral.tokenizer import DEFAULT_TOKENIZER


def main(argv: list[str] | None = None) -> dict:
    return train_main(StoryMixtral, PRESETS, DEFAULT_TOKENIZER, argv,
                      defaults={"dataset": "tinystories", "tokenizer": DEFAULT_TOKENIZER})


if __name__ == "__main__":
    run_main(main)
