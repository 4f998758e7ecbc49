"""Train StoryKimi: `python trainer.py [--preset tiny] [--flags]`, or under torchrun for DDP.

Every field of StoryKimiConfig and TrainConfig is a flag; `python trainer.py --help` lists them.
StoryKimi trains with Muon + AdamW by default (`--optimizer adamw` for AdamW alone).
"""
from smolhub.cli import run_main
from smolhub.train import main as train_main
from StoryKimi.config import PRESETS
from StoryKimi.model import StoryKimi
from StoryKimi.tokenizer import DEFAULT_TOKENIZER


def main(argv: list[str] | None = None) -> dict:
    return train_main(StoryKimi, PRESETS, DEFAULT_TOKENIZER, argv,
                      defaults={"dataset": "tinystories", "optimizer": "muon"})


if __name__ == "__main__":
    run_main(main)
