"""Train StoryKimi: `python trainer.py [--preset tiny] [--flags]`, or under torchrun for DDP.

Every field of StoryKimiConfig and TrainConfig is a flag; `python trainer.py --help` lists them.
Its defaults (dataset, tokenizer, ...) are TRAIN_DEFAULTS and PRESETS in config.py.
StoryKimi trains with Muon + AdamW by default (`--optimizer adamw` for AdamW alone).
"""
from smolhub.cli import run_main
from smolhub.train import main as train_main
from StoryKimi.model import StoryKimi


def main(argv: list[str] | None = None) -> dict:
    return train_main(StoryKimi, argv)


if __name__ == "__main__":
    run_main(main)
