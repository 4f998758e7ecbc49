"""Training objectives: what one micro-batch computes, apart from everything around it.

The engine (train.py) owns the loop, accumulation, DDP, AMP, compile, CUDA graphs, checkpoints,
exact resume, logging and signals; an objective only turns a batch into a loss. The same loop so
runs next-token pretraining, supervised fine-tuning with a loss mask, or preference optimisation
against a frozen reference: each is an `Objective`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

IGNORE_INDEX = -100  # a target the loss skips (smolhub/loss.py)


class Objective:
    """Batch in, (loss, metrics) out.

    `step_model` is what runs the step (the model compiled and/or wrapped in DDP); the objective
    keeps any other module it needs (the raw model for its auxiliary losses, a frozen reference).
    `batch` is the tuple the loader yields, already on the device. The loss is what is
    backpropagated; the metrics are detached scalars, averaged over micro-batches, steps and ranks
    and logged under their names. When the engine evaluates, the model is in eval mode without
    gradients, and `summarize` turns the averaged metrics into the reported ones (logged as
    `val_<name>`)."""

    def __call__(self, step_model: nn.Module, batch: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        return means


class NextTokenPrediction(Objective):
    """Pretraining: mean cross-entropy of every next token, plus the model's auxiliary losses (MoE
    balancing), which are trained on but not reported as the loss.

    Given the bytes each token id stands for, evaluation also reports bits per byte (`bpb`): the
    summed nats of the targets that are text (special tokens left out) over ln 2 times their UTF-8
    bytes, the unit in which models with different tokenizers compare."""

    def __init__(self, model: nn.Module, token_bytes: Sequence[int] | None = None):
        self.model = model
        self.token_bytes = None if token_bytes is None else torch.tensor(token_bytes, dtype=torch.long)

    def __call__(self, step_model: nn.Module, batch: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets = batch
        _, loss = step_model(inputs, targets)
        aux = self.model.aux_loss()
        metrics = {"loss": loss.detach()}
        if self.token_bytes is not None and not self.model.training:
            metrics["loss"] = metrics["loss"].clone()  # a CUDA graph's next replay reuses its output
            metrics.update(self.text_nats_and_bytes(step_model, inputs, targets))
        return (loss if aux is None else loss + aux), metrics

    def text_nats_and_bytes(self, step_model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
                            ) -> dict[str, torch.Tensor]:
        self.token_bytes = self.token_bytes.to(targets.device)
        n_bytes = self.token_bytes[targets]
        text = n_bytes > 0
        _, text_loss = step_model(inputs, targets.masked_fill(~text, IGNORE_INDEX))
        n_text = text.sum()
        nats = torch.where(n_text > 0, text_loss.float() * n_text, 0.0)  # a batch of special tokens only: no text
        return {"text_nats": nats, "text_bytes": n_bytes.sum().float()}

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """Sums over batches and ranks share one denominator, so the ratio of their means is theirs."""
        if "text_nats" in means:
            nats, n_bytes = means.pop("text_nats"), means.pop("text_bytes")
            means["bpb"] = nats / (math.log(2) * n_bytes) if n_bytes else float("nan")
        return means
