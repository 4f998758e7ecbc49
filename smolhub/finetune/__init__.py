"""Post-training on the training engine: supervised fine-tuning and DPO, full or LoRA (finetune/engine.py).

Every model folder's finetune.py is `main(Model, argv)`."""


def main(model_cls, argv: list[str] | None = None) -> dict:
    """The body of every model's finetune.py (the engine is imported when a run starts, not with the package)."""
    from smolhub.finetune.engine import main as finetune_main

    return finetune_main(model_cls, argv)
