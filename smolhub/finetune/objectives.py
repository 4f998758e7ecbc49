"""Fine-tuning objectives on the engine's Objective interface: SFT on packed rows, and DPO.

DPO (Rafailov et al., 2023) with the sigmoid loss, as TRL's DPOTrainer computes it:

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

where log pi(y) sums the log-probabilities of the completion's tokens; rewards are beta times those
log-ratios. The reference is a frozen model, the policy itself with its LoRA adapters disabled (no
second copy in memory), or log-probabilities precomputed once and carried in the batch.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from smolhub.objectives import IGNORE_INDEX, Objective


class SFTObjective(Objective):
    """Mean cross-entropy over the trained (assistant) targets of packed rows, attention kept within each
    example by its document ids; plus the model's auxiliary losses (MoE balancing) as in pretraining."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, step_model: nn.Module, batch: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets, document_ids = batch
        _, loss = step_model(inputs, targets, document_ids=document_ids)
        aux = self.model.aux_loss()
        return (loss if aux is None else loss + aux), {"loss": loss.detach()}


def sequence_logps(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probabilities of the labelled tokens (labels != IGNORE_INDEX), each predicted
    from the tokens before it; labels are aligned with ids, not shifted."""
    logits, _ = model(ids)
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t + 1
    nll = F.cross_entropy(logits.flatten(0, 1).float(), next_labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return -nll.view(labels.shape).sum(1)


class DPOObjective(Objective):
    """Sigmoid DPO on batches (chosen_ids, chosen_labels, rejected_ids, rejected_labels[, ref_chosen_logps,
    ref_rejected_logps]). Chosen and rejected run through the policy in one concatenated forward.

    The reference log-probabilities come from the batch when it carries them, else from
    `reference_model` (a frozen copy), else from the policy inside `disable_adapters()` (a context
    manager factory, such as peft's `model.disable_adapter`). Metrics follow TRL's DPOTrainer, with
    '_' for '/': loss, rewards_chosen, rewards_rejected, rewards_margins, rewards_accuracies,
    logps_chosen, logps_rejected (means over the batch's pairs)."""

    def __init__(self, model: nn.Module, beta: float = 0.1, *, reference_model: nn.Module | None = None,
                 disable_adapters: Callable[[], contextlib.AbstractContextManager] | None = None):
        if beta <= 0:
            raise ValueError(f"beta must be positive, not {beta}")
        if reference_model is not None and disable_adapters is not None:
            raise ValueError("give a reference model or a way to disable the adapters, not both")
        self.model, self.beta = model, beta
        self.reference_model, self.disable_adapters = reference_model, disable_adapters

    @torch.no_grad()
    def reference_logps(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) summed log-probabilities of a batch's completions under the reference."""
        chosen_ids, chosen_labels, rejected_ids, rejected_labels = batch[:4]
        ids, labels = torch.cat([chosen_ids, rejected_ids]), torch.cat([chosen_labels, rejected_labels])
        if self.reference_model is not None:
            logps = sequence_logps(self.reference_model, ids, labels)
        elif self.disable_adapters is not None:
            with self.disable_adapters():
                logps = sequence_logps(self.model, ids, labels)
        else:
            raise ValueError("DPO needs reference log-probabilities: precompute them into the data, or give "
                             "DPOObjective a reference model or disable_adapters")
        return logps.chunk(2)

    def __call__(self, step_model: nn.Module, batch: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen_ids, chosen_labels, rejected_ids, rejected_labels = batch[:4]
        # the reference runs first: with adapters disabled it is the same module, and the auxiliary
        # loss read below must be the policy forward's
        ref_chosen, ref_rejected = batch[4:6] if len(batch) == 6 else self.reference_logps(batch)
        logps = sequence_logps(step_model, torch.cat([chosen_ids, rejected_ids]),
                               torch.cat([chosen_labels, rejected_labels]))
        aux = self.model.aux_loss()
        chosen, rejected = logps.chunk(2)
        chosen_rewards = self.beta * (chosen - ref_chosen.float())
        rejected_rewards = self.beta * (rejected - ref_rejected.float())
        loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        metrics = {"loss": loss.detach(),
                   "rewards_chosen": chosen_rewards.mean(), "rewards_rejected": rejected_rewards.mean(),
                   "rewards_margins": (chosen_rewards - rejected_rewards).mean(),
                   "rewards_accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                   "logps_chosen": chosen.detach().mean(), "logps_rejected": rejected.detach().mean()}
        return (loss if aux is None else loss + aux), metrics
