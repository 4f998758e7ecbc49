"""Fine-tuning on the training engine: SFT and DPO, full or LoRA, from a checkpoint.

`Finetuning` is a `train.Stage`: it prepares the chat data (finetune/data.py), makes the model from
the base checkpoint (the chat format added to its tokenizer, its embeddings grown to fit, LoRA
adapters added), builds the objective (finetune/objectives.py) with DPO's reference, and records
the base in every checkpoint. The loop, DDP, AMP, compile, checkpoints, exact resume, signals and
logging are the pretraining engine's (smolhub/train.py).

A run's checkpoints are those of pretraining, whose config.json also holds
"finetune": {method, lora_rank, ..., "base": the base checkpoint's folder}; a LoRA run's hold its
adapter (peft's adapter_model.safetensors + adapter_config.json) instead of model.safetensors, and
load (inference, the app, --init_from) as the base with the adapter folded in. `--merge` writes that
merged model as a plain checkpoint, which needs no base (for export and push).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from smolhub.checkpoint import (ADAPTER_WEIGHTS, fine_tuning_base, load_checkpoint, read_config, resolve_checkpoint,
                                save_checkpoint, weights_file)
from smolhub.config import AUTO_BATCH, ModelConfig, TrainConfig
from smolhub.errors import UserError
from smolhub.finetune.config import FINETUNE_DEFAULTS, FINETUNE_HELPS, FinetuneConfig, settle
from smolhub.finetune.lora import (LORA_TARGETS, adapters_disabled, add_adapter, has_experts, lora_config,
                                   saved_new_rows, train_new_rows)
from smolhub.objectives import Objective
from smolhub.run_dir import RunDir
from smolhub.runtime import Runtime, autocast, autocast_dtype, on_main_first
from smolhub.train import Stage, StartingPoint, report_done, train

LORA_FIELDS = ("lora_alpha", "lora_dropout", "lora_targets", "lora_experts")
DPO_FIELDS = ("dpo_beta", "precompute_ref")
PRETRAINING_FIELDS = ("max_tokens", "num_proc", "seq_len_stages")
INVOCATION_FIELDS = frozenset({"merge"})  # the rest of a FinetuneConfig is the run's, which --resume keeps


@dataclass
class FinetuneData:
    """Tokenised training and held-out examples (finetune/data.py's SFTData or PreferenceData); the
    token counts are in rows (or pairs) of block_size, the unit of the plan lines' tokens per step."""
    train: object
    val: object
    n_train_tokens: int
    n_val_tokens: int


class Finetuning(Stage):
    def __init__(self, fcfg: FinetuneConfig, explicit: frozenset[str]):
        self.fcfg = fcfg
        self.explicit = explicit
        self.base: str | None = None  # the base checkpoint's folder
        self.reference: nn.Module | None = None  # full DPO's frozen copy of the starting weights
        self.cfg: TrainConfig | None = None
        self.data: FinetuneData | None = None

    def prepare_data(self, cfg: TrainConfig, mcfg: ModelConfig, rt: Runtime, start: StartingPoint):
        """The base's tokenizer with the chat format (a resumed run's own), and the examples tokenised
        for the model's context: rank 0 fills the cache, the others read it."""
        from smolhub.chat import add_chat_format
        from smolhub.finetune.data import PreferenceData, SFTData, load_examples
        from smolhub.tokenizer import load_tokenizer

        self.cfg = cfg
        if start.resume_from is not None:
            self.fcfg, self.base = resumed_config(self.fcfg, self.explicit, start.resume_from)
            tokenizer = load_tokenizer(start.resume_from)
        else:
            self.base = str(start.base.path.resolve())
            tokenizer = add_chat_format(start.base.tokenizer)
        if self.fcfg.merge == "end" and not self.fcfg.lora:
            raise UserError("--merge folds a LoRA adapter into the weights: a full fine-tune (--lora_rank 0) saves "
                            "plain checkpoints already")
        sft = self.fcfg.method == "sft"
        train_rows, val_rows = on_main_first(rt, lambda: load_examples(
            cfg.dataset, self.fcfg.method, val_dataset=cfg.val_dataset or None, val_fraction=cfg.val_fraction))
        kind = SFTData if sft else PreferenceData
        train_data, val_data = on_main_first(rt, lambda: (kind(train_rows, tokenizer, mcfg.block_size, cfg.data_dir),
                                                          kind(val_rows, tokenizer, mcfg.block_size, cfg.data_dir)))
        start.notes += [f"training data: {train_data.describe()}", f"held-out data: {val_data.describe()}"]
        size = (lambda d: d.n_rows) if sft else len
        self.data = FinetuneData(train_data, val_data, size(train_data) * mcfg.block_size,
                                 size(val_data) * mcfg.block_size)
        return tokenizer, self.data

    def build_model(self, model_cls: type[nn.Module], mcfg: ModelConfig, cfg: TrainConfig, tokenizer,
                    start: StartingPoint) -> nn.Module:
        """The base's weights with embeddings that fit the chat tokens, then DPO's reference (a copy
        of them, for a full fine-tune) and the LoRA adapters. A resumed run rebuilds the same from
        the base its checkpoint names, whose weights restore then overwrites or completes."""
        from smolhub.chat import added_chat_ids, fit_embeddings

        fcfg = self.fcfg
        if start.resume_from is not None and not fcfg.lora and fcfg.method == "sft":
            return model_cls(mcfg)  # every weight is in the checkpoint
        if start.base is not None:
            base = start.base.model
            fit_embeddings(base, tokenizer)
        else:
            base = fine_tuning_base(start.resume_from, read_config(start.resume_from)).model
        if base.architecture != model_cls.__name__:
            raise UserError(f"{self.base} holds a {base.architecture} model: fine-tune it with "
                            f"{base.architecture}/finetune.py")
        model = model_cls(dataclasses.replace(mcfg, vocab_size=base.config.vocab_size))
        model.load_state_dict(base.state_dict())
        if fcfg.method == "dpo" and not fcfg.lora:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if fcfg.lora:
            if "lora_experts" in self.explicit and not has_experts(model):
                raise UserError(f"--lora_experts: {model.architecture} has no experts; drop the flag")
            add_adapter(model, lora_config(model, fcfg.lora_rank, fcfg.lora_alpha, fcfg.lora_dropout,
                                           fcfg.lora_targets, fcfg.lora_experts))
            # the frozen embedding holds the rows of the tokens just added at their shared initial value
            new_rows = added_chat_ids(tokenizer) if start.resume_from is None else saved_new_rows(start.resume_from)
            if new_rows:
                train_new_rows(model, new_rows)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            experts = " and the experts" if model.peft_config["default"].target_parameters else ""
            rows = f" and the rows of {len(new_rows)} new tokens" if new_rows else ""
            start.notes.append(f"LoRA rank {fcfg.lora_rank} (alpha {fcfg.lora_alpha or 2 * fcfg.lora_rank:g}) on "
                               f"{' '.join(fcfg.lora_targets)}{experts}{rows}: {trainable / 1e6:.3f}M trainable "
                               "parameters")
        return model

    def loaders(self, data: FinetuneData, cfg: TrainConfig, rt: Runtime, block_size: int):
        from smolhub.finetune.data import PreferenceLoader, SFTLoader

        def loader(examples, shuffle: bool, batch_size: int):
            if self.fcfg.method == "sft":
                return SFTLoader(examples, batch_size, rt.rank, rt.world_size, cfg.seed, shuffle)
            compiled = cfg.compile == "true" or (cfg.compile == "auto" and rt.device.type == "cuda")
            return PreferenceLoader(examples, batch_size, rt.rank, rt.world_size, cfg.seed, shuffle,
                                    fixed_width=compiled)  # one shape, one compilation

        # a held-out split is often smaller than one training batch: evaluate it in smaller batches
        # (at least one row per process, else the loader says there is too little of it)
        held_out = data.val.n_rows if self.fcfg.method == "sft" else len(data.val)
        val_batch = max(1, min(cfg.batch_size, held_out // rt.world_size))
        loader(data.val, False, val_batch)  # too few held-out examples fail here, not at the first eval
        return loader(data.train, True, cfg.batch_size), lambda: loader(data.val, False, val_batch)

    def record(self) -> dict:
        fields = {k: v for k, v in dataclasses.asdict(self.fcfg).items() if k not in INVOCATION_FIELDS}
        return {"finetune": {**fields, "base": self.base}}

    def make_objective(self, model: nn.Module, tokenizer) -> Objective:
        """SFT's loss on assistant tokens, or DPO against the reference: the model with its adapters
        off (LoRA), or the frozen copy; with --precompute_ref, log-probabilities computed here once
        for every pair, which the batches then carry (and the copy is let go)."""
        from smolhub.finetune.objectives import DPOObjective, SFTObjective

        if self.fcfg.method == "sft":
            return SFTObjective(model)
        device = next(model.parameters()).device
        beta = self.fcfg.dpo_beta
        if self.fcfg.lora:
            objective = DPOObjective(model, beta, disable_adapters=lambda: reference_mode(model))
        else:
            objective = DPOObjective(model, beta, reference_model=self.reference.to(device))
        if not self.fcfg.precompute_ref:
            return objective
        amp = autocast(device, autocast_dtype(self.cfg, device))

        def reference_logps(batch):
            with amp:
                return objective.reference_logps(tuple(t.to(device) for t in batch))

        for examples in (self.data.train, self.data.val):
            examples.precompute_reference(reference_logps, self.cfg.batch_size)
        self.reference = None
        return DPOObjective(model, beta)


@contextlib.contextmanager
def reference_mode(model: nn.Module):
    """The policy as DPO's reference under LoRA: adapters off, and in eval mode (no dropout)."""
    training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            yield
    finally:
        model.train(training)


def resumed_config(fcfg: FinetuneConfig, explicit: frozenset[str], checkpoint: Path) -> tuple[FinetuneConfig, str]:
    """The FinetuneConfig a resumed run continues with (its checkpoint's; a flag that differs is
    refused), and its base checkpoint."""
    record = read_config(checkpoint).get("finetune")
    if record is None:
        raise UserError(f"--resume {checkpoint}: a pretraining checkpoint; continue it with trainer.py --resume, or "
                        "fine-tune it with --init_from")
    saved = {f.name: record[f.name] for f in dataclasses.fields(FinetuneConfig)
             if f.name not in INVOCATION_FIELDS and f.name in record}
    conflicts = [f"--{name} {getattr(fcfg, name)} (checkpoint: {value})" for name, value in saved.items()
                 if name in explicit and getattr(fcfg, name) != value]
    if conflicts:
        raise UserError(f"--resume continues {checkpoint.name} as it was trained: {', '.join(conflicts)}; drop them")
    return dataclasses.replace(fcfg, **saved), record["base"]


def parse_finetune_flags(model_cls: type[nn.Module], argv: list[str] | None):
    """finetune.py's flags -> (model config, TrainConfig, FinetuneConfig), a cli.Parsed."""
    from smolhub.cli import parse_cli

    name = model_cls.__name__
    return parse_cli((model_cls.config_class, TrainConfig, FinetuneConfig), None, argv,
                     defaults={**FINETUNE_DEFAULTS, "lora_targets": LORA_TARGETS[name]}, helps=FINETUNE_HELPS,
                     prog=f"{name}/finetune.py",
                     description=f"Fine-tune a {name} checkpoint (--init_from) into an assistant: SFT on "
                     "conversations or instructions, or DPO on preference pairs; every weight, or LoRA adapters "
                     "(--lora_rank). Unless given, --lr is 5e-5 for full SFT, 1e-3 for LoRA SFT, 5e-6 for full DPO "
                     "and 5e-5 for LoRA DPO (--min_lr a tenth of it), --dataset yahma/alpaca-cleaned (SFT) or "
                     "trl-lib/ultrafeedback_binarized (DPO), and --out_dir out/" + name + "-sft, -lora or -dpo. "
                     "The model's fields that shape training (--dropout, --grad_checkpointing, ...) apply; its "
                     "architecture and tokenizer are the checkpoint's.")


def check_fields(fcfg: FinetuneConfig, explicit: frozenset[str]) -> None:
    """A flag that this run does not use (of pretraining's data, of another method, of LoRA without
    it) is refused rather than ignored."""
    unused = [f"--{n}" for n in PRETRAINING_FIELDS if n in explicit]
    if unused:
        raise UserError(f"{', '.join(unused)} shape pretraining's token stream: a fine-tune trains on whole examples "
                        "at the full context; drop them")
    unused = [f"--{n}" for n in LORA_FIELDS if n in explicit and not fcfg.lora]
    if unused:
        raise UserError(f"{', '.join(unused)} configure LoRA: add --lora_rank R (for instance 16), or drop them")
    unused = [f"--{n}" for n in DPO_FIELDS if n in explicit and fcfg.method != "dpo"]
    if unused:
        raise UserError(f"{', '.join(unused)} configure DPO: add --method dpo, or drop them")


def resume_dir(spec: str) -> str:
    """The run folder of --resume PATH (a checkpoint folder's parent, or the out_dir itself)."""
    path = Path(spec).expanduser()
    return str(path.parent if (path / "config.json").is_file() else path)


def main(model_cls: type[nn.Module], argv: list[str] | None = None) -> dict:
    """The body of every model's finetune.py: flags -> configs -> a fine-tuning run on the engine, or
    --merge PATH alone."""
    mcfg, cfg, fcfg = parsed = parse_finetune_flags(model_cls, argv)
    explicit = parsed.explicit
    if fcfg.merge not in ("", "end"):
        extra = sorted(explicit - {"merge", "out_dir", "overwrite"})
        if extra:
            raise UserError(f"--merge PATH merges an adapter and exits: it takes --out_dir and --overwrite, not "
                            f"{', '.join('--' + f for f in extra)}")
        merged_to = merge_checkpoint(fcfg.merge, cfg.out_dir, cfg.overwrite)
        print(f"merged {fcfg.merge} into {merged_to}")
        return {"merged": str(merged_to)}
    check_fields(fcfg, explicit)
    if not cfg.init_from and not cfg.resume:
        raise UserError("--init_from is required: the checkpoint to fine-tune (a checkpoint folder, a run's out_dir or "
                        "a Hub id), e.g. --init_from out/" + model_cls.__name__)
    if cfg.batch_size == AUTO_BATCH:
        raise UserError("--batch_size auto sizes pretraining steps; give fine-tuning a number of sequences (pairs "
                        "for DPO)")
    if cfg.resume not in ("", "latest") and "out_dir" not in explicit:
        cfg = dataclasses.replace(cfg, out_dir=resume_dir(cfg.resume))  # continue in the run's own folder
    cfg = settle(cfg, fcfg, explicit, model_cls.__name__)
    stage = Finetuning(fcfg, explicit)
    result = train(model_cls, mcfg, cfg, stage.make_objective, explicit, stage)
    if report_done(result) and fcfg.merge == "end":
        result["merged"] = str(merge_checkpoint(result["out_dir"], "", overwrite=True))
        print(f"merged into {result['merged']}")
    return result


def merge_checkpoint(path: str, out_dir: str, overwrite: bool) -> Path:
    """Write the LoRA checkpoint `path` (a folder, or a run's out_dir: its newest) with its adapter
    folded in, as a plain checkpoint in out_dir (default: the run's folder + "-merged")."""
    folder = resolve_checkpoint(path)
    if weights_file(folder).name != ADAPTER_WEIGHTS:
        raise UserError(f"{folder} holds no LoRA adapter (its model.safetensors is a plain checkpoint already)")
    loaded = load_checkpoint(str(folder))
    run_dir = RunDir(out_dir or f"{resume_dir(str(folder)).rstrip('/')}-merged")
    run_dir.claim()
    try:
        run_id = run_dir.start_new(overwrite)
        record = {"finetune": {**loaded.config["finetune"], "merged_from": str(folder.resolve())}}
        return save_checkpoint(run_dir.path, loaded.meta.get("step", 0), loaded.model, loaded.tokenizer,
                               {**loaded.meta, "run_id": run_id, "params": loaded.model.num_params(),
                                "active_params": loaded.model.num_active_params()}, record=record)
    finally:
        run_dir.release()
