"""The training engine shared by the five models: `setup` builds a run, `fit` runs its loop.

One process or many under torchrun (DDP); bf16 autocast (fp16 with dynamic loss scaling where bf16
is missing, fp32 on CPU); gradient accumulation up to a target number of tokens per step;
torch.compile and CUDA graphs on CUDA; warmup + cosine schedules; gradient clipping; progressive
sequence length; periodic eval, samples and checkpoints; exact resume; SIGTERM/SIGINT save a
checkpoint and stop. What a step computes is an `Objective` (objectives.py), so pretraining and
post-training share all of this.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from smolhub.checkpoint import (LoadedCheckpoint, load_checkpoint, load_weights, read_config, read_meta,
                                resume_point, run_checkpoints, save_checkpoint)
from smolhub.config import AUTO_BATCH, ModelConfig, TrainConfig, pad_vocab, reconcile_with_checkpoint
from smolhub.errors import UserError
from smolhub.generate import Engine, SamplingConfig
from smolhub.log import MetricsLogger
from smolhub.objectives import NextTokenPrediction, Objective
from smolhub.optim import build_optimizer, build_scheduler
from smolhub.plan import auto_batch_size, eta_line, plan_lines
from smolhub.run_dir import RunDir, unwritable
from smolhub.runtime import (Interrupted, Runtime, StopSignal, autocast, autocast_dtype, gather_rng_states,
                             max_over_ranks, mean_over_ranks, on_main_first, raise_if_stopped, set_rng_state,
                             setup_runtime, teardown_runtime)
from smolhub.tokenizer import token_byte_lengths


def grad_accum_steps(cfg: TrainConfig, block_size: int, world_size: int) -> int:
    micro_tokens = cfg.batch_size * block_size * world_size
    if cfg.tokens_per_step == 0:
        return 1
    if cfg.tokens_per_step % micro_tokens:
        raise UserError(f"--tokens_per_step {cfg.tokens_per_step} must be a multiple of batch_size x block_size x "
                        f"processes = {cfg.batch_size} x {block_size} x {world_size} = {micro_tokens}")
    return cfg.tokens_per_step // micro_tokens


def seq_len_at(step: int, cfg: TrainConfig, block_size: int) -> int:
    """Progressive sequence length: equal shares of the steps for each stage, then the full context."""
    stages = cfg.seq_lens() + [block_size]
    return stages[min(len(stages) - 1, step * len(stages) // cfg.horizon)]


def check_seq_len_stages(cfg: TrainConfig, block_size: int) -> None:
    for s in cfg.seq_lens():
        if s <= 0 or s >= block_size or block_size % s:
            raise UserError(f"--seq_len_stages: {s} must be a divisor of block_size ({block_size}) below it")


def use_cuda_graphs(cfg: TrainConfig, rt: Runtime, use_compile: bool, accum: int) -> bool:
    """Whether the compiled model replays CUDA graphs (--cuda_graphs); 'true' where they can't is an error."""
    blockers = [why for why, blocked in [
        ("a CUDA device", rt.device.type != "cuda"), ("--compile", not use_compile),
        ("one process (not torchrun)", rt.distributed),
        (f"one micro-batch per step (this run has {accum}: lower --tokens_per_step or raise --batch_size)", accum > 1),
    ] if blocked]
    if cfg.cuda_graphs == "true" and blockers:
        raise UserError(f"--cuda_graphs true needs {', '.join(blockers)}; or set --cuda_graphs auto")
    return cfg.cuda_graphs != "false" and not blockers


@dataclass(frozen=True)
class Due:
    """What the loop does after a step. Every interval is decided here and nowhere else."""
    log: bool
    eval: bool
    sample: bool
    save: bool

    @classmethod
    def at(cls, step: int, cfg: TrainConfig, stopping: bool, out_of_time: bool = False) -> "Due":
        last = step == cfg.max_steps or out_of_time

        def every(interval: int) -> bool:
            return last or (interval > 0 and step % interval == 0)

        return cls(log=every(cfg.log_interval), eval=every(cfg.eval_interval),
                   sample=cfg.sample_interval > 0 and every(cfg.sample_interval),
                   save=stopping or every(cfg.save_interval))


class MetricWindow:
    """The objective's metrics and the tokens trained since the last log line, summed on the device
    so that no step waits for the GPU; `flush` averages them over steps and ranks."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.tokens = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], tokens: int) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.steps += 1
        self.tokens += tokens

    def flush(self, rt: Runtime) -> dict:
        means = {name: mean_over_ranks(total / self.steps, rt) for name, total in self.sums.items()}
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        means["tok_per_s"] = self.tokens / (time.perf_counter() - self.started)
        self.sums, self.steps, self.tokens = {}, 0, 0
        return means


@torch.no_grad()
def evaluate(step_model: nn.Module, objective: Objective, make_loader: Callable[[], object], n_batches: int,
             amp, rt: Runtime) -> dict[str, float]:
    """The objective's metrics, as val_<name>, over the first n_batches of a fresh validation loader
    (the same batches every time; at most one pass over it)."""
    step_model.eval()
    loader = make_loader()
    n_batches = min(n_batches, loader.batches_per_epoch)  # a small split is read once, not counted twice
    sums: dict[str, torch.Tensor] = {}
    for _ in range(n_batches):
        batch = tuple(t.to(rt.device) for t in loader.next_batch())
        with amp:
            _, metrics = objective(step_model, batch)
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0) + value.float()  # a new tensor: a CUDA graph reuses its outputs
    step_model.train()
    means = objective.summarize({name: mean_over_ranks(total / n_batches, rt) for name, total in sums.items()})
    return {f"val_{name}": value for name, value in means.items()}


@dataclass
class Trainer:
    """Everything a run needs, built by `setup`. Two handles on the network: `model`, the raw
    module (saved, sampled, stepped by the optimizer) and `step_model`, what runs the step (the
    model compiled and/or wrapped in DDP)."""
    cfg: TrainConfig
    rt: Runtime
    model: nn.Module
    step_model: nn.Module
    objective: Objective
    sampler: Engine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: contextlib.AbstractContextManager
    loader: object
    make_val_loader: Callable[[], object]
    logger: MetricsLogger
    out_dir: Path
    accum: int
    tokens_per_step: int
    peak_flops: float
    run_id: str | None
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0  # spent in training steps (for --max_seconds), carried over a resume
    record: dict = field(default_factory=dict)  # more entries of each checkpoint's config.json (Stage.record)
    first_nonfinite: torch.Tensor = field(init=False)  # the first step whose loss was nan/inf (0: none), on the device

    def __post_init__(self):
        self.first_nonfinite = torch.zeros((), dtype=torch.long, device=self.rt.device)

    def train_step(self, seq_len: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step over `accum` micro-batches; returns the step's metrics and gradient norm."""
        metrics: dict[str, torch.Tensor] = {}
        for micro in range(self.accum):
            batch = tuple(t.to(self.rt.device, non_blocking=True) for t in self.loader.next_batch(seq_len))
            sync = micro == self.accum - 1 or not self.rt.distributed  # DDP all-reduces on the last only
            with (contextlib.nullcontext() if sync else self.step_model.no_sync()), self.amp:
                loss, micro_metrics = self.objective(self.step_model, batch)
            self.watch_finite(loss)
            self.scaler.scale(loss / self.accum).backward()
            for name, value in micro_metrics.items():
                metrics[name] = metrics.get(name, 0) + value / self.accum
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.model.after_optimizer_step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return metrics, grad_norm

    def watch_finite(self, loss: torch.Tensor) -> None:
        """Note the first step whose loss is not finite, without waiting for the device."""
        bad = ~torch.isfinite(loss.detach()) & (self.first_nonfinite == 0)
        self.first_nonfinite = torch.where(bad, self.step + 1, self.first_nonfinite)

    def check_finite(self) -> None:
        """Stop the run once its loss has gone nan/inf (every rank together), before anything of it is
        logged as if it were training or saved."""
        bad_step = max_over_ranks(self.first_nonfinite, self.rt)
        if bad_step:
            self.stop_non_finite("the training loss", bad_step)

    def stop_non_finite(self, what: str, step: int) -> None:
        ckpts = run_checkpoints(self.out_dir, self.run_id)
        last = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was saved"
        raise UserError(f"{what} became nan or inf at step {step}: stopped at step {self.step} without saving; "
                        f"{last}. Lower --lr (now {self.cfg.lr:g}) or raise --warmup_steps and start again")

    def out_of_time(self) -> bool:
        """--max_seconds reached (on any rank: all stop together)."""
        if not self.cfg.max_seconds:
            return False
        spent = self.train_seconds >= self.cfg.max_seconds
        if not self.rt.distributed:
            return spent
        return max_over_ranks(torch.tensor(int(spent), device=self.rt.device), self.rt) > 0

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.step_model, self.objective, self.make_val_loader, self.cfg.eval_batches, self.amp,
                        self.rt)

    def save(self, val_loss: float | None) -> None:
        self.check_finite()
        states = gather_rng_states(self.rt)  # a collective: every rank takes part
        if not self.rt.is_main:
            return
        if not torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all():
            self.stop_non_finite("the weights", self.step)
        meta = {"step": self.step, "tokens_seen": self.tokens_seen, "val_loss": val_loss, "dataset": self.cfg.dataset,
                "params": self.model.num_params(), "active_params": self.model.num_active_params(),
                "run_id": self.run_id}
        trainer_state = {"step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                         "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                         "loader": self.loader.state_dict(), "rng": states, "train_config": asdict(self.cfg)}
        try:
            path = save_checkpoint(self.out_dir, self.step, self.model, self.sampler.tokenizer, meta, trainer_state,
                                   self.cfg.keep_last, self.record)
        except OSError as e:
            previous = run_checkpoints(self.out_dir, self.run_id)
            kept = f"{previous[-1]} is intact: continue from it with --resume" if previous else "nothing was saved"
            raise UserError(f"{unwritable(self.out_dir, e)}; the checkpoint of step {self.step} was not saved, "
                            f"{kept}")
        self.logger.write(f"saved {path}")

    def log_record(self, window: MetricWindow, seq_len: int, grad_norm: torch.Tensor) -> dict:
        record = window.flush(self.rt)
        record.update(lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm.item(), seq_len=seq_len,
                      **self.model.train_metrics())
        if self.rt.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
        if self.peak_flops:
            record["mfu"] = (self.model.flops_per_token(seq_len) * record["tok_per_s"]
                             / (self.peak_flops * self.rt.world_size))
        return record


def fit(t: Trainer, stop: StopSignal) -> dict:
    """The training loop: step, then log / evaluate / sample / save as `Due` says, until max_steps
    or a stop signal."""
    cfg = t.cfg
    stop.defer()
    t.model.train()
    pbar = tqdm(total=cfg.max_steps, initial=t.step, disable=not t.rt.is_main, dynamic_ncols=True)
    last_val: float | None = None
    if t.step == 0:  # the starting point of the curve
        first = t.evaluate()
        last_val = first["val_loss"]
        t.logger.log({"step": 0, "tokens": 0, "seconds": 0.0, **first})
        t.logger.write(f"step 0: val loss {last_val:.4f}")
    window = MetricWindow()
    windows = 0
    stopping = False
    try:
        while t.step < cfg.max_steps:
            started = time.perf_counter()
            seq_len = seq_len_at(t.step, cfg, t.model.config.block_size)
            metrics, grad_norm = t.train_step(seq_len)
            window.add(metrics, t.tokens_per_step)
            pbar.update(1)
            t.train_seconds += time.perf_counter() - started

            stopping = stop.agreed(t.rt)
            out_of_time = t.out_of_time()
            due = Due.at(t.step, cfg, stopping, out_of_time)
            if due.log or due.eval or due.save:
                t.check_finite()
            record = {"step": t.step, "tokens": t.tokens_seen, "seconds": t.train_seconds}
            if due.log:
                record.update(t.log_record(window, seq_len, grad_norm))
                windows += 1
                if windows == 2 and t.step < cfg.max_steps:  # the first window holds compilation and warm-up
                    t.logger.write(eta_line(t.step, cfg.max_steps, t.tokens_per_step, record["tok_per_s"],
                                            cfg.max_seconds, t.train_seconds))
            if due.eval:
                record.update(t.evaluate())
                last_val = record["val_loss"]
            if due.log or due.eval:
                t.logger.log(record)
                pbar.set_postfix(progress_postfix(record))
            if due.sample and t.rt.is_main:
                t.logger.write(f"step {t.step} sample: {cfg.sample_prompt}{sample(t.sampler, cfg)}")
            if due.save:
                t.save(last_val)
                t.logger.plot()
            if out_of_time and not stopping:
                t.logger.write(f"--max_seconds {cfg.max_seconds:g}: {t.train_seconds:.1f} s of training, stopped at "
                               f"step {t.step}")
                break
            if stopping:
                by = signal.Signals(stop.signum).name if stop.signum else "another process's signal"
                t.logger.write(f"stopped by {by} at step {t.step}; continue with --resume")
                break
            if due.log:
                window.restart_clock()  # evaluation, samples and saves stay out of tok/s
    finally:
        pbar.close()
        t.logger.finish()
    return {"step": t.step, "tokens_seen": t.tokens_seen, "val_loss": last_val, "out_dir": str(t.out_dir),
            "stopped_by": (stop.signum or signal.SIGTERM) if stopping else None}


def progress_postfix(record: dict) -> dict:
    """The progress bar's summary of a log record."""
    shown = {"loss": "{:.3f}", "lr": "{:.2e}", "tok_per_s": "{:,.0f}", "mfu": "{:.1%}", "val_loss": "{:.3f}",
             "val_bpb": "{:.3f}"}
    labels = {"tok_per_s": "tok/s", "val_loss": "val", "val_bpb": "bpb"}
    return {labels.get(k, k): fmt.format(record[k]) for k, fmt in shown.items() if k in record}


def next_token_prediction(model: nn.Module, tokenizer) -> Objective:
    """Pretraining's objective, reporting bits per byte in evaluation."""
    return NextTokenPrediction(model, token_byte_lengths(tokenizer, model.config.vocab_size))


class Stage:
    """What differs between the kinds of run this engine trains: the tokenizer and data, the model
    made from the starting point, and what a checkpoint records besides the weights. This class is
    pretraining; smolhub/finetune builds supervised fine-tuning and DPO on the same hooks, and all
    else (the loop, DDP, AMP, compile, checkpoints, resume, signals, logging) is common."""

    def prepare_data(self, cfg: TrainConfig, mcfg: ModelConfig, rt: Runtime, start: StartingPoint):
        """The run's tokenizer and data (whose n_train_tokens the plan lines count epochs of)."""
        return prepare_data(cfg, mcfg, rt, start.resume_from, start.base)

    def build_model(self, model_cls: type[nn.Module], mcfg: ModelConfig, cfg: TrainConfig, tokenizer,
                    start: StartingPoint) -> nn.Module:
        """The model, on the CPU, with the weights it starts from (restore loads a --resume's later)."""
        model = build_model(model_cls, mcfg, cfg, tokenizer)
        if start.base is not None:
            model.load_state_dict(start.base.model.state_dict())
        return model

    def loaders(self, data, cfg: TrainConfig, rt: Runtime, block_size: int) -> tuple[object, Callable[[], object]]:
        """The training loader and a maker of fresh validation loaders: next_batch(seq_len) gives the
        tuple the objective takes, state_dict/load_state_dict the position for an exact resume."""
        from smolhub.data import PackedLoader

        def packed_loader(shards: list[str], shuffle: bool) -> PackedLoader:
            return PackedLoader(shards, data.dtype, cfg.batch_size, block_size, rank=rt.rank,
                                world_size=rt.world_size, seed=cfg.seed, shuffle=shuffle)

        return packed_loader(data.train_shards, shuffle=True), lambda: packed_loader(data.val_shards, shuffle=False)

    def record(self) -> dict:
        """More entries of every checkpoint's config.json."""
        return {}


def train(model_cls: type[nn.Module], mcfg: ModelConfig, cfg: TrainConfig,
          make_objective: Callable[[nn.Module, object], Objective] = next_token_prediction,
          explicit: frozenset[str] = frozenset(), stage: Stage | None = None) -> dict:
    """Train model_cls and return the final metrics. Owns the process group, the stop signals and
    the lock on the output folder for the whole run, setup included. `explicit`: the fields given
    on the command line or in --config (cli.Parsed), which a checkpoint may not silently override.
    `stage`: what kind of run (pretraining by default)."""
    rt = setup_runtime(cfg)
    stop = StopSignal()
    run_dir = RunDir(cfg.out_dir or f"out/{model_cls.__name__}")
    try:
        return fit(setup(model_cls, mcfg, cfg, rt, run_dir, make_objective, explicit, stage or Stage()), stop)
    finally:
        stop.restore()
        run_dir.release()
        teardown_runtime(rt)


def setup(model_cls: type[nn.Module], mcfg: ModelConfig, cfg: TrainConfig, rt: Runtime, run_dir: RunDir,
          make_objective: Callable[[nn.Module, object], Objective] = next_token_prediction,
          explicit: frozenset[str] = frozenset(), stage: Stage | None = None) -> Trainer:
    """Build a run: its starting point (new, --resume or --init_from), tokenizer and data, model,
    optimizer, what runs the step, and the logger; `stage` says what differs between kinds of run."""
    stage = stage or Stage()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    out_dir = run_dir.path
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and rt.device.type == "cuda")
    use_cuda_graphs(cfg, rt, use_compile, accum=1)  # where they can never run, fail before the data is read
    start = starting_point(mcfg, cfg, rt, run_dir, explicit)
    mcfg, cfg, resume_from = start.mcfg, start.cfg, start.resume_from

    tokenizer, data = stage.prepare_data(cfg, mcfg, rt, start)
    raise_if_stopped()
    model = stage.build_model(model_cls, mcfg, cfg, tokenizer, start)
    if cfg.batch_size == AUTO_BATCH:
        picked, line = auto_batch_size(model, lambda m: make_objective(m, tokenizer), cfg, rt,
                                       autocast_dtype(cfg, rt.device), min(data.n_train_tokens, data.n_val_tokens))
        cfg = dataclasses.replace(cfg, batch_size=picked)  # what the checkpoint records, and --resume keeps
        start.notes.append(line)
    model.to(rt.device)
    optimizer = build_optimizer(model, cfg, rt.device.type)
    scheduler = build_scheduler(optimizer, cfg)
    amp_dtype = autocast_dtype(cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp_dtype == torch.float16)
    block_size = model.config.block_size
    loader, make_val_loader = stage.loaders(data, cfg, rt, block_size)
    step, tokens_seen = 0, 0
    if resume_from is not None:
        step, tokens_seen = restore(resume_from, start.state, model, optimizer, scheduler, scaler, loader, rt)
    accum = grad_accum_steps(cfg, block_size, rt.world_size)
    graphs = use_cuda_graphs(cfg, rt, use_compile, accum)
    tokens_per_step = accum * cfg.batch_size * block_size * rt.world_size
    run_config = {"architecture": model_cls.__name__, "model": model.config.to_dict(), "train": asdict(cfg),
                  "world_size": rt.world_size, "tokens_per_step": tokens_per_step,
                  "params": model.num_params(), "active_params": model.num_active_params()}
    logger = MetricsLogger(out_dir, cfg, run_config, enabled=rt.is_main, start_step=step)
    for note in start.notes:
        logger.write(note)
    where = f"resuming {resume_from} at step {step}" if resume_from else "starting"
    logger.write(f"{model_cls.__name__}: {model.num_params() / 1e6:.2f}M parameters "
                 f"({model.num_active_params() / 1e6:.2f}M active), {where}; {rt.world_size} process(es) on "
                 f"{rt.device.type}, {amp_dtype}, compile={use_compile}, cuda_graphs={graphs}")
    for line in plan_lines(tokens_per_step, cfg.batch_size, accum, rt.world_size, block_size, cfg.max_steps, step,
                           data.n_train_tokens):
        logger.write(line)
    return Trainer(cfg=cfg, rt=rt, model=model, step_model=step_model_for(model, rt, use_compile, graphs),
                   objective=make_objective(model, tokenizer), sampler=Engine(model, tokenizer),
                   optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp=autocast(rt.device, amp_dtype),
                   loader=loader, make_val_loader=make_val_loader, logger=logger,
                   out_dir=out_dir, accum=accum, tokens_per_step=tokens_per_step,
                   peak_flops=(cfg.peak_tflops or (989.5 if rt.device.type == "cuda" else 0.0)) * 1e12,
                   run_id=start.run_id, step=step, tokens_seen=tokens_seen,
                   train_seconds=start.state.get("train_seconds", 0.0) if start.state else 0.0,
                   record=stage.record())


@dataclass
class StartingPoint:
    """Where a run starts (new; the checkpoint --resume continues, with its trainer state; or the
    weights --init_from starts from), the configs settled against it, and the run's id."""
    mcfg: ModelConfig
    cfg: TrainConfig
    run_id: str | None
    notes: list[str]
    resume_from: Path | None = None
    state: dict | None = None
    base: LoadedCheckpoint | None = None


def starting_point(mcfg: ModelConfig, cfg: TrainConfig, rt: Runtime, run_dir: RunDir,
                   explicit: frozenset[str]) -> StartingPoint:
    """Claim the output folder (rank 0), find the checkpoint to start from, settle the configs
    with it (refusing what it fixes), and only then make the folder hold this run: a refusal
    leaves another run's files where they are."""
    if rt.is_main:
        run_dir.claim()
    resume_from, state, notes = on_main_first(rt, lambda: resume_point(cfg.resume, run_dir.path)) \
        if cfg.resume else (None, None, [])
    base = load_checkpoint(cfg.init_from) if cfg.init_from else None
    if resume_from is not None or base is not None:
        mcfg, cfg, settled = reconcile_with_checkpoint(
            mcfg, cfg, explicit, resume_from or base.path, read_config(resume_from) if resume_from else base.config,
            state["train_config"] if resume_from else None)
        notes += settled
    run_id = None
    if rt.is_main:
        run_id = run_dir.continue_run(read_meta(resume_from).get("run_id"), resume_from) if resume_from \
            else run_dir.start_new(cfg.overwrite)
    return StartingPoint(mcfg, cfg, run_id, notes, resume_from, state, base)


def prepare_data(cfg: TrainConfig, mcfg: ModelConfig, rt: Runtime, resume_from: Path | None, base):
    """The run's tokenizer (a checkpoint's own when resuming or initialising from one) and its data,
    tokenised for the model's context: rank 0 trains/tokenises into the cache, the other ranks then
    read it."""
    from smolhub.data import training_data, training_tokenizer
    from smolhub.tokenizer import load_tokenizer

    if resume_from is not None:
        tokenizer = load_tokenizer(resume_from)
    elif base is not None:
        tokenizer = base.tokenizer
    else:
        tokenizer = on_main_first(rt, lambda: training_tokenizer(cfg))
    return tokenizer, on_main_first(rt, lambda: training_data(cfg, tokenizer, mcfg.block_size))


def build_model(model_cls: type[nn.Module], mcfg: ModelConfig, cfg: TrainConfig, tokenizer) -> nn.Module:
    """A fresh model of mcfg (for a run from a checkpoint, already reconciled with its config)."""
    if mcfg.vocab_size == 0:
        mcfg.vocab_size = pad_vocab(len(tokenizer))
    if mcfg.vocab_size < len(tokenizer):
        raise UserError(f"--vocab_size {mcfg.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    check_seq_len_stages(cfg, mcfg.block_size)
    return model_cls(mcfg)


def step_model_for(model: nn.Module, rt: Runtime, use_compile: bool, graphs: bool) -> nn.Module:
    """What runs the step: the model, compiled (replaying CUDA graphs where they apply), in DDP
    when there are several processes."""
    if use_compile:
        model = torch.compile(model, mode="reduce-overhead" if graphs else None)
    if rt.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return model


def restore(folder: Path, state: dict, model: nn.Module, optimizer, scheduler, scaler, loader,
            rt: Runtime) -> tuple[int, int]:
    """Continue exactly where the checkpoint in `folder` (with trainer state `state`) stopped:
    weights, optimizer, schedule, loss scale, data position and every rank's RNG. Returns (step,
    tokens seen)."""
    load_weights(model, folder)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"][rt.rank % len(state["rng"])], rt.device)
    return state["step"], state["tokens_seen"]


def sample(engine: Engine, cfg: TrainConfig) -> str:
    """A short sample in eval mode, outside the training autocast: on CUDA the engine captures its
    decode step as a CUDA graph once, and every later sample of the run replays it (the graph reads
    the weights in place, so it sees each step's update)."""
    engine.model.eval()
    text = "".join(engine.stream(cfg.sample_prompt, SamplingConfig(
        max_new_tokens=min(64, engine.model.config.block_size // 2), temperature=0.8, top_k=50, seed=cfg.seed)))
    engine.model.train()
    return text


def parse_train_flags(model_cls: type[nn.Module], argv: list[str] | None):
    """A model's trainer flags -> (model config, TrainConfig), a cli.Parsed: the model's config.py holds
    its TRAIN_DEFAULTS (dataset, tokenizer, ...) and PRESETS; flags override both."""
    import importlib

    from smolhub.cli import parse_cli

    config = importlib.import_module(model_cls.config_class.__module__)
    return parse_cli((model_cls.config_class, TrainConfig), config.PRESETS, argv, defaults=config.TRAIN_DEFAULTS,
                     prog=f"{model_cls.__name__}/trainer.py", description=f"Train {model_cls.__name__}.")


def main(model_cls: type[nn.Module], argv: list[str] | None = None) -> dict:
    """The body of every model's trainer.py: flags -> configs -> train."""
    mcfg, cfg = parsed = parse_train_flags(model_cls, argv)
    result = train(model_cls, mcfg, cfg, explicit=parsed.explicit)
    report_done(result)
    return result


def report_done(result: dict) -> bool:
    """The end of a run's command: a stop signal becomes its exit (cli.run_main exits 128 + signum),
    else rank 0 prints the summary line. Returns whether this process is rank 0."""
    if result["stopped_by"] is not None:
        raise Interrupted(result["stopped_by"])
    if int(os.environ.get("RANK", 0)) != 0:
        return False
    val = f"{result['val_loss']:.4f}" if result["val_loss"] is not None else "n/a"
    print(f"done: step {result['step']}, {result['tokens_seen']:,} tokens, val loss {val}, "
          f"checkpoints in {result['out_dir']}")
    return True
