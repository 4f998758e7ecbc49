"""What a fine-tuning run adds to TrainConfig, and the training defaults that suit one.

`finetune.py` takes the model's config fields, TrainConfig and FinetuneConfig as flags. A run starts
from a checkpoint (--init_from), so the architecture and tokenizer are the checkpoint's; the
training fields default to FINETUNE_DEFAULTS, and the learning rate, the dataset and the output
folder to what suits the method (`settle`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from smolhub.config import TrainConfig, check_finite, option
from smolhub.errors import UserError


@dataclass
class FinetuneConfig:
    """How to fine-tune: the method, LoRA, DPO, and merging an adapter into plain weights."""

    method: Literal["sft", "dpo"] = option(
        "sft", "sft: supervised fine-tuning, the loss on the assistant's tokens only (examples packed, each attending "
        "to itself). dpo: direct preference optimisation on chosen/rejected pairs against a frozen reference.")
    lora_rank: int = option(0, "Rank of the LoRA adapters (peft); 0 = full fine-tuning of every weight.")
    lora_alpha: float = option(0.0, "LoRA scale: the update is (alpha / rank) B A; 0 = 2 x --lora_rank.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch's input (needs --no_lora_experts on MoE models).")
    lora_targets: list[str] = option([], "Module names that get adapters; the default is the architecture's attention "
                                     "and feed-forward projections (finetune/lora.py LORA_TARGETS).")
    lora_experts: bool = option(True, "On MoE models, also adapt the 3-D expert weights (a rank-r update per expert, "
                                "peft target_parameters).",
                                off="On MoE models, leave the expert weights frozen and adapt attention (and the "
                                "dense/shared feed-forwards) only.")
    dpo_beta: float = option(0.1, "DPO's beta: how far the policy may move from the reference (larger = closer).")
    precompute_ref: bool = option(False, "DPO: compute the reference log-probabilities of every training and held-out "
                                  "pair once before training (one pass of the reference, none per step).")
    merge: str = option("", "Fold a LoRA adapter into a plain checkpoint that every command (export and push too) "
                        "loads as usual: `--merge` alone on a LoRA run merges its last checkpoint when it ends; "
                        "`--merge PATH` merges the adapter checkpoint PATH (folder or out_dir) and exits. The result "
                        "goes to <the run's out_dir>-merged (with PATH, --out_dir sets it).",
                        nargs="?", const="end", metavar="PATH")

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ["lora_rank", "lora_alpha", "dpo_beta"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.dpo_beta == 0:
            raise UserError("--dpo_beta must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def run_suffix(self) -> str:
        """The default output folder is out/<Model>-<suffix>."""
        return "dpo" if self.method == "dpo" else "lora" if self.lora else "sft"


# Training defaults of finetune.py (flags and --config override them): a thousand steps of a short
# warmup and cosine, frequent evaluation, no weight decay (the starting weights are the prior), no
# samples (a sample prompt is text, not a conversation). CUDA graphs stay off: a DPO step runs
# several forwards, and SFT batches carry document masks. The learning rate and dataset shown are
# full SFT's; `settle` picks the method's.
FINETUNE_DEFAULTS = dict(max_steps=1000, warmup_steps=50, eval_interval=100, eval_batches=20, log_interval=10,
                         save_interval=200, weight_decay=0.0, sample_interval=0, cuda_graphs="false",
                         val_fraction=0.02, lr=5e-5, min_lr=5e-6, dataset="yahma/alpaca-cleaned")

# Peak learning rates by (method, LoRA) where --lr is not given: full fine-tuning moves every weight
# and takes a rate ~10x below pretraining's; LoRA's fresh low-rank factors need a larger one; DPO's
# loss saturates quickly and takes one ~10x smaller again.
LEARNING_RATES = {("sft", False): 5e-5, ("sft", True): 1e-3, ("dpo", False): 5e-6, ("dpo", True): 5e-5}
DATASETS = {"sft": "yahma/alpaca-cleaned", "dpo": "trl-lib/ultrafeedback_binarized"}

# what --dataset and --val_fraction mean to finetune.py, which reads whole examples, not a token stream
FINETUNE_HELPS = {
    "dataset": "Examples to train on: a Hub dataset id or a local .json/.jsonl/.parquet file or folder, in any of "
               "the forms the README lists (Alpaca instructions, messages/conversations, prompt/completion; "
               "DPO: prompt/chosen/rejected). Default: yahma/alpaca-cleaned for SFT, "
               "trl-lib/ultrafeedback_binarized for DPO.",
    "val_fraction": "Fraction of the examples held out for evaluation (the same rows whatever the seed) when the "
                    "dataset has no validation split and no --val_dataset is given.",
}


def settle(cfg: TrainConfig, fcfg: FinetuneConfig, explicit: frozenset[str], architecture: str) -> TrainConfig:
    """The TrainConfig of a fine-tuning run: the method's learning rate (min_lr a tenth of it) and
    dataset, and out/<Model>-sft|-lora|-dpo, where they are not given; LoRA runs eager unless
    --compile true."""
    lr = cfg.lr if "lr" in explicit else LEARNING_RATES[fcfg.method, fcfg.lora]
    changes = dict(lr=lr, min_lr=cfg.min_lr if "min_lr" in explicit else lr / 10)
    if "dataset" not in explicit:
        changes["dataset"] = DATASETS[fcfg.method]
    if not cfg.out_dir:
        changes["out_dir"] = f"out/{architecture}-{fcfg.run_suffix}"
    if fcfg.lora and cfg.compile == "auto":
        # peft's LoRA layers break the compiled graph and recompile for each distinct projection shape
        # (measured on an H100: over 30 s without finishing a step of a MoE model): eager unless asked
        changes["compile"] = "false"
    return dataclasses.replace(cfg, **changes)
