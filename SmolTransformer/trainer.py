"""Train SmolTransformer: `python trainer.py [--preset tiny] [--flags]`, or under torchrun for DDP.

The default data is FineWeb-Edu (sample-10BT) streamed from the Hub; tokenise it ahead of a
multi-GPU run with `python -m smolhub.data prepare` (see README.md). Every field of
SmolTransformerConfig and TrainConfig is a flag; `python trainer.py --help` lists them.
Its defaults (dataset, tokenizer, ...) are TRAIN_DEFAULTS and PRESETS in config.py.
"""
from smolhub.cli import run_main
from smolhub.train import main as train_main
from SmolTransformer.model import SmolTransformer


def main(argv: list[str] | None = None) -> dict:
    return train_main(SmolTransformer, argv)


if __name__ == "__main__":
    run_main(main)
