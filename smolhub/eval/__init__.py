"""Evaluation of SmolHub checkpoints. `intrinsic` scores a dataset's text: loss, perplexity and bits
per byte, the last comparable across tokenizers. `report` writes a checkpoint's report card (those
numbers, the downstream tasks' scores, what was trained on how much) as Markdown and JSON, which
`python -m smolhub_hub push` puts into the model card. `python -m smolhub.eval` runs both, with
downstream tasks through lm-evaluation-harness."""
