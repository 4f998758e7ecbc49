"""Train StoryMixtral: `python trainer.py [--preset tiny] [--flags]`, or under torchrun for DDP.

Every field of StoryMixtralConfig and TrainConfig is a flag; `python trainer.py --help` lists them.
Its defaults (dataset, tokenizer, ...) are TRAIN_DEFAULTS and PRESETS in config.py.
The balancing losses join the training loss; metrics.jsonl logs them and the expert load.
"""
from smolhub.cli import run_main
from smolhub.train import main as train_main
from StoryMixtral.model import StoryMixtral


def main(argv: list[str] | None = None) -> dict:
    return train_main(StoryMixtral, argv)


if __name__ == "__main__":
    run_main(main)
