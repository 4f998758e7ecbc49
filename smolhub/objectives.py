"""Training objectives: what one micro-batch computes, apart from everything around it.

The engine (train.py) owns the loop, accumulation, DDP, AMP, compile, CUDA graphs, checkpoints,
exact resume, logging and signals; an objective only turns a batch into a loss. The same loop so
runs next-token pretraining, supervised fine-tuning with a loss mask, or preference optimisation
against a frozen reference: each is an `Objective`.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn


class Objective(Protocol):
    """Batch in, (loss, metrics) out.

    `step_model` is what runs the step (the model compiled and/or wrapped in DDP); the objective
    keeps any other module it needs (the raw model for its auxiliary losses, a frozen reference).
    `batch` is the tuple the loader yields, already on the device. The loss is what is
    backpropagated; the metrics are detached scalars, averaged over micro-batches, steps and ranks
    and logged under their names (and under `val_<name>` when the engine evaluates, where the
    objective runs in eval mode without gradients)."""

    def __call__(self, step_model: nn.Module, batch: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class NextTokenPrediction:
    """Pretraining: mean cross-entropy of every next token, plus the model's auxiliary losses (MoE
    balancing), which are trained on but not reported as the loss."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, step_model: nn.Module, batch: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets = batch
        _, loss = step_model(inputs, targets)
        aux = self.model.aux_loss()
        return (loss if aux is None else loss + aux), {"loss": loss.detach()}
