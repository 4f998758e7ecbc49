"""Configs as documented dataclasses, their validation, and what a run that starts from a
checkpoint takes from it (reconcile_with_checkpoint).

Every field is a command-line flag whose help is the field's `option` text (see smolhub/cli.py).
A model's config.py subclasses `ModelConfig` (or `MoEConfig`) with its own defaults, next to its
PRESETS and TRAIN_DEFAULTS.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from smolhub.errors import UserError


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text shows up in `--help` (a list default becomes a factory)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


def check_finite(cfg: Any) -> None:
    """nan slips past every range check (nan <= 0 is false), and no field means inf."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name} must be a finite number, got {value}")


EXPERTS_KERNELS = ("auto", "grouped_mm", "triton", "loop")


def experts_kernel_option() -> Any:
    """The --experts_kernel field of the MoE models' configs (smolhub.layers.GroupedExperts)."""
    return option("auto", "How the routed experts run: grouped_mm (torch's grouped GEMM; bf16 on an H100-class "
                  "GPU), triton (smolhub/kernels/moe.py: the gathers and the SwiGLU inside the matmuls; CUDA), loop "
                  "(the exact reference, one expert at a time), or auto (grouped_mm where it runs, triton on "
                  "other CUDA GPUs in bf16, else loop).",
                  choices=EXPERTS_KERNELS)


AUTO_BATCH = 0  # --batch_size auto: the largest micro-batch that fits, picked at start (smolhub/plan.py)


def micro_batch(text: str) -> int:
    """--batch_size's value: a number of sequences, or auto."""
    if text == "auto":
        return AUTO_BATCH
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor auto") from None


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows are padded to a multiple of 64 so matmuls hit the fast tensor-core shapes."""
    return (n + multiple - 1) // multiple * multiple


@dataclass
class ModelConfig:
    """Fields every architecture shares. Each model subclasses this with its own defaults."""

    # Fields that shape how the weights are trained, not the function they compute: a run started
    # with --init_from sets them like any training flag (see reconcile_with_checkpoint).
    training_fields = frozenset({"dropout", "grad_checkpointing", "bf16_residual"})
    # how, not what, the model computes: a resumed run and a loaded checkpoint take this run's or the default
    compute_fields = frozenset({"grad_checkpointing"})

    vocab_size: int = option(0, "Embedding rows; 0 = the tokenizer's size padded to a multiple of 64.")
    block_size: int = option(512, "Context length in tokens.")
    n_layer: int = option(8, "Number of transformer blocks.")
    n_embd: int = option(768, "Model width (d_model).")
    n_head: int = option(12, "Query heads.")
    dropout: float = option(0.0, "Dropout on attention weights and residual branches (0 disables it).")
    norm_eps: float = option(1e-5, "Epsilon of the normalisation layers.")
    tie_embeddings: bool = option(True, "Share the token embedding and the output head.",
                                  off="Give the output head its own weights, apart from the token embedding.")
    init_std: float = option(0.02, "Std of the normal init; residual projections get std/sqrt(2*n_layer).")
    grad_checkpointing: bool = option(False, "Recompute each block in backward to save activation memory.")
    bf16_residual: bool = option(True, "Under bf16 autocast, carry the residual stream in bf16 (as torchtitan and "
                                 "Megatron do) rather than fp32 (as nanoGPT and transformers do): half the memory "
                                 "traffic of the residual adds and norms; what each costs in speed and loss: "
                                 "README.md, \"Default runs\".",
                                 off="Under bf16 autocast, carry the residual stream in fp32 (as nanoGPT and "
                                 "transformers do): more precise; its speed and loss against bf16: README.md, "
                                 "\"Default runs\".")

    def __post_init__(self) -> None:
        check_finite(self)
        positive = ["block_size", "n_layer", "n_embd", "n_head", "norm_eps", "init_std"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise UserError(f"--vocab_size must be 0 (from the tokenizer) or positive, got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def for_inference(cls, d: dict) -> "ModelConfig":
        """A checkpoint's config (from_dict) to run the model on this machine: its compute_fields at
        their defaults (a run trained with --experts_kernel triton on a GPU still loads on a CPU)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return dataclasses.replace(cls.from_dict(d), **{name: fields[name].default for name in cls.compute_fields})

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"config.json has fields {unknown} that {cls.__name__} does not know: "
                            "is it a checkpoint of another model or a newer SmolHub?")
        return cls(**d)


def check_kv_heads(cfg: ModelConfig) -> None:
    if cfg.n_kv_heads <= 0 or cfg.n_head % cfg.n_kv_heads:
        raise UserError(f"--n_head {cfg.n_head} must be divisible by --n_kv_heads {cfg.n_kv_heads}")


def check_rope(cfg: ModelConfig) -> None:
    if cfg.head_dim % 2:
        raise UserError(f"RoPE needs an even head dimension; n_embd/n_head = {cfg.head_dim}")
    if cfg.rope_theta <= 0:
        raise UserError(f"--rope_theta must be positive, got {cfg.rope_theta}")


@dataclass
class MoEConfig(ModelConfig):
    """The Mixtral-style sparse feed-forward that SmolMixtral and StoryMixtral share."""

    training_fields = ModelConfig.training_fields | {"aux_loss_weight", "router_z_loss_weight", "experts_kernel"}
    compute_fields = ModelConfig.compute_fields | {"experts_kernel"}

    n_experts: int = option(8, "SwiGLU experts per MoE layer.")
    top_k: int = option(2, "Experts each token is routed to.")
    expert_hidden: int = option(1024, "Hidden width of each SwiGLU expert.")
    aux_loss_weight: float = option(0.01, "Weight of the Switch load-balancing loss (1 when balanced, "
                                    "n_experts / top_k when collapsed), averaged over layers.")
    router_z_loss_weight: float = option(0.0, "Weight of the router z-loss mean(logsumexp(logits)^2) "
                                         "(ST-MoE), averaged over layers; 0 = off.")
    capacity_factor: float = option(0.0, "Drop the lowest-weighted assignments beyond capacity_factor x "
                                    "tokens x top_k / n_experts per expert; 0 = drop nothing.")
    experts_kernel: str = experts_kernel_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_experts <= 0 or self.expert_hidden <= 0:
            raise UserError(f"--n_experts and --expert_hidden must be positive, got {self.n_experts} "
                            f"and {self.expert_hidden}")
        if not 1 <= self.top_k <= self.n_experts:
            raise UserError(f"--top_k {self.top_k} must be between 1 and --n_experts {self.n_experts}")
        for name in ["aux_loss_weight", "router_z_loss_weight", "capacity_factor"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    """How to train: data, optimisation, precision, logging and checkpoints."""

    # data
    dataset: str = option("tinystories", "tinystories | tinyshakespeare | synthetic | fineweb | fineweb-edu | "
                          "openwebtext | a local .txt/.jsonl/.parquet file or folder (optionally .gz).")
    val_dataset: str = option("", "Separate validation data (same forms as --dataset); empty = the "
                              "source's own validation split, else a held-out tail of --dataset.")
    val_fraction: float = option(0.01, "Fraction of the tokens held out for validation when there is no split.")
    max_tokens: int = option(0, "Cap on the training tokens prepared (0 = all).")
    data_dir: str = option("data_cache", "Where tokenised shards and trained tokenizers are cached.")
    num_proc: int = option(1, "Processes that tokenise the data in parallel when preparing it (same tokens "
                           "for any number).")
    tokenizer: str = option("", "gpt2 | bpe | a folder with a saved tokenizer or GPT-2 vocab.json+merges.txt; "
                            "each model's trainer defaults to its own (TRAIN_DEFAULTS in its config.py).")
    bpe_vocab_size: int = option(32000, "Vocabulary size when --tokenizer bpe trains one on the corpus.")
    # batch and schedule
    batch_size: int = option(16, "Sequences per micro-batch on each process, or auto: the largest that fits this "
                             "GPU's memory (CPU: half the RAM) among the divisors of the sequences a process trains "
                             "per --tokens_per_step, found once at start by trial steps and stated in the log; the "
                             "checkpoint records the number, which --resume keeps.", type=micro_batch)
    tokens_per_step: int = option(0, "Tokens per optimizer step over all processes; gradient accumulation "
                                  "makes up the rest. 0 = one micro-batch per process.")
    max_steps: int = option(5000, "Optimizer steps to train for.")
    max_seconds: float = option(0.0, "Also stop (evaluate, save, exit 0) once this many seconds were spent training "
                                "(the steps, compile included; evaluation, samples and saves not); 0 = no limit. "
                                "The schedule stays laid out over --max_steps: for runs compared at equal time.")
    lr: float = option(6e-4, "Peak learning rate.")
    min_lr: float = option(6e-5, "Floor of the cosine decay.")
    warmup_steps: int = option(200, "Linear warmup steps.")
    schedule: Literal["cosine", "cosine_restarts", "constant"] = option(
        "cosine", "Learning-rate schedule after warmup.")
    restart_period: int = option(1000, "Steps per cycle of --schedule cosine_restarts.")
    schedule_steps: int = option(0, "Steps that the warmup + cosine and --seq_len_stages are laid out over; "
                                 "0 = --max_steps. Steps past it train at --min_lr on the full context (a --resume "
                                 "that raises --max_steps keeps the checkpoint's, rather than re-stretch the cosine).")
    weight_decay: float = option(0.1, "Weight decay (AdamW's, and Muon's with --optimizer muon), applied to "
                                 "weight matrices and embeddings only; >= 0.")
    beta1: float = option(0.9, "AdamW beta1, in [0, 1).")
    beta2: float = option(0.95, "AdamW beta2, in [0, 1).")
    optimizer: Literal["adamw", "muon"] = option(
        "adamw", "adamw: AdamW for everything. muon: Muon for the hidden weight matrices (3-D expert stacks "
        "per expert matrix), AdamW for embeddings, the output head, norms and biases.")
    muon_lr: float = option(0.0, "Peak learning rate of the Muon parameters with --optimizer muon; 0 = --lr. "
                            "Muon's updates are scaled to AdamW's RMS (Moonlight), so one rate can serve both.")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this (0 disables clipping).")
    seq_len_stages: str = option("", "Progressive sequence length: comma-separated lengths, each dividing "
                                 "block_size, trained for equal shares of --schedule_steps before the full context "
                                 "(e.g. '128,256'). Tokens per step stay constant.")
    # precision and speed
    device: str = option("auto", "auto | cpu | cuda | cuda:N. Under torchrun each process takes its local rank.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto", "Autocast precision; auto = bf16 on GPUs that have it, fp16 + loss scaling otherwise, fp32 on CPU.")
    compile: Literal["auto", "true", "false"] = option("auto", "torch.compile the model; auto = on CUDA only.")
    cuda_graphs: Literal["auto", "true", "false"] = option(
        "auto", "Replay the compiled forward and backward as CUDA graphs (torch.compile mode 'reduce-overhead'): "
        "the CPU's kernel launches leave the step. Needs compile, one CUDA process and one micro-batch per step "
        "(CUDA graphs corrupt accumulated gradients: pytorch/pytorch#169545); auto = on where those hold.")
    deterministic: bool = option(False, "torch.use_deterministic_algorithms, for bit-exact reruns.")
    seed: int = option(1337, "Seed for init, data order and sampling.")
    # evaluation, samples, logging
    eval_interval: int = option(250, "Evaluate every N steps (and at the end).")
    eval_batches: int = option(20, "Validation micro-batches averaged per evaluation.")
    log_interval: int = option(10, "Write metrics every N steps.")
    sample_interval: int = option(500, "Print a sample generation every N steps (0 disables).")
    sample_prompt: str = option("Once upon a time", "Prompt of the periodic samples.")
    wandb_mode: Literal["online", "offline", "disabled"] = option(
        "online", "wandb logging; online falls back to offline when no API key is configured.")
    wandb_project: str = option("smolhub", "wandb project.")
    run_name: str = option("", "Run name for wandb (default: the model name).")
    peak_tflops: float = option(0.0, "Accelerator peak for MFU; 0 = H100 dense bf16 (989.5) on CUDA, no MFU on CPU.")
    # checkpoints
    out_dir: str = option("", "Output folder for checkpoints, metrics.jsonl and the loss curve; "
                          "empty = out/<Model>.")
    save_interval: int = option(1000, "Save a checkpoint every N steps (and at the end).")
    keep_last: int = option(3, "Keep only the newest N checkpoints (0 keeps all).")
    resume: str = option("", "Continue a run exactly: `--resume` alone takes the newest checkpoint of --out_dir that "
                         "loads (setting aside unreadable ones); `--resume PATH` a checkpoint folder, or a run's "
                         "out_dir. Empty = a new run. The model and training fields are the checkpoint's: a flag "
                         "or --config value that differs is refused, except --max_steps (see --schedule_steps), "
                         "--grad_checkpointing and what concerns this invocation only (output, device, compile, "
                         "intervals, logging, --keep_last).", nargs="?", const="latest", metavar="PATH")
    overwrite: bool = option(False, "Start a new run in an --out_dir that holds another run, deleting that run's "
                             "checkpoints and records (without it such a run is refused).")
    init_from: str = option("", "Start a new run from the weights of this checkpoint (folder, out_dir or Hub id) "
                            "with a fresh optimizer: the checkpoint's architecture and tokenizer are kept (a flag "
                            "that differs from them is refused); dropout, grad_checkpointing, bf16_residual, the "
                            "loss weights and every training field (--lr ...) are this run's.")

    def __post_init__(self) -> None:
        if self.batch_size == "auto":  # `batch_size: auto` in a --config file
            self.batch_size = AUTO_BATCH
        if isinstance(self.batch_size, int) and self.batch_size < 0:
            raise UserError(f"--batch_size must be a positive number or auto, got {self.batch_size}")
        if self.batch_size == AUTO_BATCH and self.tokens_per_step == 0:
            raise UserError("--batch_size auto divides --tokens_per_step into micro-batches: set --tokens_per_step "
                            "(tokens per optimizer step over all processes) or give --batch_size a number")
        for name in ["max_steps", "eval_batches", "log_interval", "eval_interval", "save_interval",
                     "num_proc"]:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        check_finite(self)
        for name in ["warmup_steps", "tokens_per_step", "sample_interval", "keep_last", "max_tokens", "schedule_steps",
                     "weight_decay", "grad_clip", "peak_tflops", "max_seconds"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ["beta1", "beta2"]:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= --min_lr <= --lr and --lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.muon_lr < 0:
            raise UserError(f"--muon_lr must be >= 0 (0 = --lr), got {self.muon_lr}")
        if self.muon_lr and self.optimizer != "muon":
            raise UserError("--muon_lr sets Muon's learning rate: use it with --optimizer muon")
        if self.restart_period <= 0:
            raise UserError(f"--restart_period must be positive, got {self.restart_period}")
        if isinstance(self.resume, bool):  # `resume: true` in a --config file
            self.resume = "latest" if self.resume else ""
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in --out_dir and --overwrite deletes it: drop one")
        if self.resume and self.init_from:
            raise UserError("--resume and --init_from exclude each other: resume continues out_dir, "
                            "init_from starts a new run from other weights")
        self.seq_lens()

    @property
    def horizon(self) -> int:
        """The steps that the schedule and the sequence-length stages are laid out over."""
        return self.schedule_steps or self.max_steps

    def seq_lens(self) -> list[int]:
        try:
            return [int(s) for s in self.seq_len_stages.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seq_len_stages must be comma-separated integers, got {self.seq_len_stages!r}")


# The TrainConfig fields that concern one invocation of the trainer, not what the run computes: a
# --resume takes them from this invocation. Every other field comes from the checkpoint.
INVOCATION_FIELDS = frozenset({
    "out_dir", "resume", "overwrite", "init_from", "data_dir", "num_proc", "device", "compile", "cuda_graphs",
    "deterministic", "eval_interval", "eval_batches", "log_interval", "sample_interval", "sample_prompt",
    "wandb_mode", "wandb_project", "run_name", "peak_tflops", "save_interval", "keep_last", "max_seconds"})


def reconcile_with_checkpoint(mcfg: ModelConfig, cfg: TrainConfig, explicit: Collection[str], checkpoint: Path,
                              config: dict, train_config: dict | None) -> tuple[ModelConfig, TrainConfig, list[str]]:
    """The configs of a run that starts from `checkpoint` (its config.json `config`; for --resume, the
    TrainConfig it was trained with), and the lines to log about them.

    --resume continues that run as it was trained: every field is the checkpoint's except those of
    INVOCATION_FIELDS, the model's compute_fields (the same math, e.g. grad_checkpointing's in less
    memory, or another experts kernel) and --max_steps, whose
    steps past the checkpoint's schedule train at its end (schedule_steps keeps the horizon).
    --init_from starts a new run from its weights: the architecture and tokenizer are the
    checkpoint's, and what trains them (training_fields and every TrainConfig field) is this run's.
    A field in `explicit` (given as a flag or in --config) that the checkpoint would override is
    refused, naming the checkpoint's value."""
    explicit = set(explicit)
    config_class = type(mcfg)
    ckpt_model = config_class.from_dict(config["model"]).to_dict()
    keep = config_class.compute_fields if cfg.resume else config_class.training_fields
    conflicts = [(name, getattr(mcfg, name), value) for name, value in ckpt_model.items()
                 if name in explicit - keep and getattr(mcfg, name) != value
                 and not (name == "vocab_size" and mcfg.vocab_size == 0)]  # 0: whatever the tokenizer needs
    model = config_class(**{**ckpt_model, **{name: getattr(mcfg, name) for name in keep}})
    if not cfg.resume:
        conflicts += [(name, getattr(cfg, name), "its own tokenizer") for name in ("tokenizer", "bpe_vocab_size")
                      if name in explicit]
        if conflicts:
            raise UserError(f"--init_from {checkpoint} keeps the checkpoint's architecture and tokenizer: "
                            f"{_listed(conflicts)}; drop them")
        return model, dataclasses.replace(cfg, tokenizer=str(checkpoint)), []

    trained = {f.name: train_config.get(f.name, f.default) for f in dataclasses.fields(TrainConfig)
               if f.name not in INVOCATION_FIELDS | {"max_steps"}}  # a field newer than the run: its default
    conflicts += [(name, getattr(cfg, name), value) for name, value in trained.items()
                  if name in explicit and getattr(cfg, name) != value
                  and not (name == "batch_size" and cfg.batch_size == AUTO_BATCH)]  # auto: the one it picked
    if conflicts:
        raise UserError(f"--resume continues {checkpoint.name} as it was trained: {_listed(conflicts)}; drop them "
                        f"to continue it (--init_from {checkpoint} starts a new run from its weights, with new "
                        "training settings)")
    planned, step = train_config["max_steps"], config["meta"]["step"]
    max_steps = cfg.max_steps if "max_steps" in explicit else planned
    horizon = trained["schedule_steps"] or planned
    if max_steps <= step:
        raise UserError(f"--resume: {checkpoint.name} is at step {step} and --max_steps is {max_steps}, so nothing "
                        "is left to train; pass a larger --max_steps to train on")
    notes = []
    if max_steps != planned:
        trained["schedule_steps"] = horizon
        past = f"; steps {horizon + 1}-{max_steps} train at --min_lr {trained['min_lr']:g}" \
            if max_steps > horizon and trained["schedule"] == "cosine" else ""
        notes.append(f"--max_steps {max_steps} (the checkpoint's run: {planned}): the schedule keeps its "
                     f"{horizon}-step horizon (--schedule_steps {horizon}){past}")
    return model, dataclasses.replace(cfg, **trained, max_steps=max_steps), notes


def _listed(conflicts: list[tuple[str, Any, Any]]) -> str:
    def shown(value: Any) -> str:
        return repr(value) if value == "" else str(value)

    return ", ".join(f"--{name} {shown(given)} (checkpoint: {shown(value)})" for name, given, value in conflicts)
