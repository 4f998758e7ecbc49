"""The training engine shared by the five models.

One process or many under torchrun (DDP: NCCL on GPUs, gloo on CPU); bf16 autocast (fp16 with
dynamic loss scaling where bf16 is missing, fp32 on CPU); gradient accumulation up to a target
number of tokens per step; torch.compile on CUDA; warmup + cosine schedules; gradient clipping;
progressive sequence length; periodic eval, samples and checkpoints; exact resume; SIGTERM/SIGINT
save a checkpoint and stop.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model as load_safetensors_into
from tqdm import tqdm

from smolhub.checkpoint import latest_checkpoint, load_checkpoint, load_trainer_state, read_config, save_checkpoint
from smolhub.config import ModelConfig, TrainConfig, pad_vocab
from smolhub.errors import UserError
from smolhub.generate import SamplingConfig, stream_text
from smolhub.log import MetricsLogger
from smolhub.optim import build_optimizer, build_scheduler


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Read torchrun's environment; start the process group when there are several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif cfg.device == "cuda" and world_size > 1:
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, local_rank, world_size, device)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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
    return stages[min(len(stages) - 1, step * len(stages) // cfg.max_steps)]


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


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class StopSignal:
    """SIGTERM/SIGINT ask the loop to save and stop at the end of the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, rt: Runtime) -> bool:
        """All ranks stop together: one rank's signal stops every rank."""
        if not rt.distributed:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def on_main_first(rt: Runtime, fn):
    """Run fn on rank 0 first (it fills a cache), then on the others (they read it)."""
    if rt.is_main:
        result = fn()
    if rt.distributed:
        dist.barrier()
    if not rt.is_main:
        result = fn()
    return result


def mean_over_ranks(value: torch.Tensor, rt: Runtime) -> float:
    if rt.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if rt.device.type == "cuda" else dist.ReduceOp.SUM)
        if rt.device.type != "cuda":  # gloo has no AVG
            value /= rt.world_size
    return value.item()


@torch.no_grad()
def evaluate(model, loader_factory, n_batches: int, amp, rt: Runtime) -> float:
    """Mean loss over the first n_batches of the validation stream (the same batches every time)."""
    model.eval()
    loader = loader_factory()
    total = torch.zeros((), device=rt.device)
    for _ in range(n_batches):
        x, y = loader.next_batch()
        with amp:
            _, loss = model(x.to(rt.device), y.to(rt.device))
        total += loss.float()
    model.train()
    return mean_over_ranks(total / n_batches, rt)


def train(model_cls, mcfg: ModelConfig, cfg: TrainConfig, default_tokenizer: str = "gpt2") -> dict:
    """Train model_cls and return the final metrics. Sets up and tears down the process group."""
    rt = setup_runtime(cfg)
    try:
        return _train(model_cls, mcfg, cfg, default_tokenizer, rt)
    finally:
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(model_cls, mcfg: ModelConfig, cfg: TrainConfig, default_tokenizer: str, rt: Runtime) -> dict:
    from smolhub.data import PackedLoader, training_data, training_tokenizer
    from smolhub.tokenizer import load_tokenizer

    arch = model_cls.__name__
    out_dir = Path(cfg.out_dir or f"out/{arch}")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)

    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and rt.device.type == "cuda")
    use_cuda_graphs(cfg, rt, use_compile, accum=1)  # where they can never run, fail before the data is read
    resume_from = latest_checkpoint(out_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise UserError(f"--resume: no complete checkpoint in {out_dir}; drop --resume to start a new run")
    base = load_checkpoint(cfg.init_from) if cfg.init_from else None

    # tokenizer and data: rank 0 trains/tokenises into the cache, the other ranks then read it
    if resume_from is not None:
        tokenizer = load_tokenizer(resume_from)
    elif base is not None:
        tokenizer = base.tokenizer
    else:
        tokenizer = on_main_first(rt, lambda: training_tokenizer(cfg, default_tokenizer))
    data = on_main_first(rt, lambda: training_data(cfg, tokenizer))

    # model
    if resume_from is not None or base is not None:
        source = resume_from or base.path
        mcfg = model_cls.config_class.from_dict(read_config(source)["model"])
    elif mcfg.vocab_size == 0:
        mcfg.vocab_size = pad_vocab(len(tokenizer))
    if mcfg.vocab_size < len(tokenizer):
        raise UserError(f"--vocab_size {mcfg.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    check_seq_len_stages(cfg, mcfg.block_size)
    model = model_cls(mcfg)
    if base is not None:
        model.load_state_dict(base.model.state_dict())
    model.to(rt.device)

    optimizer = build_optimizer(model, cfg, rt.device.type)
    scheduler = build_scheduler(optimizer, cfg)
    amp_dtype = autocast_dtype(cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp_dtype == torch.float16)
    amp = (torch.autocast(rt.device.type, dtype=amp_dtype) if amp_dtype != torch.float32
           else contextlib.nullcontext())

    loader = PackedLoader(data.train_shards, data.dtype, cfg.batch_size, mcfg.block_size, rank=rt.rank,
                          world_size=rt.world_size, seed=cfg.seed, shuffle=True)

    def val_loader():
        return PackedLoader(data.val_shards, data.dtype, cfg.batch_size, mcfg.block_size, rank=rt.rank,
                            world_size=rt.world_size, seed=cfg.seed, shuffle=False)

    start_step, tokens_seen = 0, 0
    if resume_from is not None:
        load_safetensors_into(model, str(resume_from / "model.safetensors"))
        state = load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"][rt.rank % len(state["rng"])], rt.device)
        start_step, tokens_seen = state["step"], state["tokens_seen"]

    accum = grad_accum_steps(cfg, mcfg.block_size, rt.world_size)
    graphs = use_cuda_graphs(cfg, rt, use_compile, accum)
    fwd_model = torch.compile(model, mode="reduce-overhead" if graphs else None) if use_compile else model
    train_model = fwd_model
    if rt.distributed:
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(fwd_model, device_ids=device_ids)

    tokens_per_step = accum * cfg.batch_size * mcfg.block_size * rt.world_size
    peak_flops = (cfg.peak_tflops or (989.5 if rt.device.type == "cuda" else 0.0)) * 1e12
    run_config = {"architecture": arch, "model": mcfg.to_dict(), "train": asdict(cfg),
                  "world_size": rt.world_size, "tokens_per_step": tokens_per_step,
                  "params": model.num_params(), "active_params": model.num_active_params()}
    logger = MetricsLogger(out_dir, cfg, run_config, enabled=rt.is_main, start_step=start_step)
    if rt.is_main:
        where = f"resuming {resume_from} at step {start_step}" if resume_from else "starting"
        logger.write(f"{arch}: {model.num_params() / 1e6:.2f}M parameters ({model.num_active_params() / 1e6:.2f}M "
                     f"active), {where}; {rt.world_size} process(es) on {rt.device.type}, {amp_dtype}, "
                     f"compile={use_compile}, cuda_graphs={graphs}, {tokens_per_step} tokens/step "
                     f"({accum} micro-batches)")

    def save(step: int, val_loss: float | None) -> None:
        states = [None] * rt.world_size
        if rt.distributed:
            dist.all_gather_object(states, rng_state(rt.device))
        else:
            states = [rng_state(rt.device)]
        if rt.is_main:
            meta = {"step": step, "tokens_seen": tokens_seen, "val_loss": val_loss, "dataset": cfg.dataset,
                    "params": model.num_params(), "active_params": model.num_active_params()}
            trainer_state = {"step": step, "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "loader": loader.state_dict(), "rng": states, "train_config": asdict(cfg)}
            path = save_checkpoint(out_dir, step, model, tokenizer, meta, trainer_state, cfg.keep_last)
            logger.write(f"saved {path}")

    stop = StopSignal()
    model.train()
    last_val: float | None = None
    step = start_step
    pbar = tqdm(total=cfg.max_steps, initial=start_step, disable=not rt.is_main, dynamic_ncols=True)
    if start_step == 0:  # the starting point of the curve
        last_val = evaluate(fwd_model, val_loader, cfg.eval_batches, amp, rt)
        logger.log({"step": 0, "tokens": 0, "val_loss": last_val})
        logger.write(f"step 0: val loss {last_val:.4f}")
    t_last, tokens_since = time.perf_counter(), 0
    loss_window = torch.zeros((), device=rt.device)
    steps_in_window = 0
    try:
        while step < cfg.max_steps:
            seq_len = seq_len_at(step, cfg, mcfg.block_size)
            step_loss = torch.zeros((), device=rt.device)
            for micro in range(accum):
                x, y = loader.next_batch(seq_len)
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                sync = micro == accum - 1 or not rt.distributed
                with (contextlib.nullcontext() if sync else train_model.no_sync()), amp:
                    _, loss = train_model(x, y)
                    aux = model.aux_loss()
                    total = loss if aux is None else loss + aux
                scaler.scale(total / accum).backward()
                step_loss += loss.detach() / accum
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            model.after_optimizer_step()
            step += 1
            tokens_seen += tokens_per_step
            tokens_since += tokens_per_step
            loss_window += step_loss
            steps_in_window += 1
            pbar.update(1)

            last = step == cfg.max_steps
            logging = step % cfg.log_interval == 0 or last
            evaluating = step % cfg.eval_interval == 0 or last
            record = {"step": step, "tokens": tokens_seen}
            if logging:
                loss_val = mean_over_ranks(loss_window / steps_in_window, rt)
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                tok_s = tokens_since / (time.perf_counter() - t_last)
                record.update(loss=loss_val, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm.item(),
                              tok_per_s=tok_s, seq_len=seq_len, **model.train_metrics())
                if peak_flops:
                    record["mfu"] = model.flops_per_token(seq_len) * tok_s / (peak_flops * rt.world_size)
                loss_window.zero_()
                steps_in_window = 0
            if evaluating:
                last_val = record["val_loss"] = evaluate(fwd_model, val_loader, cfg.eval_batches, amp, rt)
            if logging or evaluating:
                logger.log(record)
            if logging:
                postfix = {"loss": f"{loss_val:.3f}", "lr": f"{record['lr']:.2e}", "tok/s": f"{tok_s:,.0f}"}
                if "mfu" in record:
                    postfix["mfu"] = f"{record['mfu']:.1%}"
                if "val_loss" in record:
                    postfix["val"] = f"{last_val:.3f}"
                pbar.set_postfix(postfix)
            if rt.is_main and cfg.sample_interval and (step % cfg.sample_interval == 0 or last):
                logger.write(f"step {step} sample: {cfg.sample_prompt}{sample(model, tokenizer, cfg)}")
            stopping = stop.agreed(rt)
            if step % cfg.save_interval == 0 or last or stopping:
                save(step, last_val)
                logger.plot()
            if stopping:
                logger.write(f"stopped by signal at step {step}; resume with --resume")
                break
            if logging:
                t_last, tokens_since = time.perf_counter(), 0
    finally:
        stop.restore()
        pbar.close()
        logger.finish()
    return {"step": step, "tokens_seen": tokens_seen, "val_loss": last_val, "out_dir": str(out_dir)}


def sample(model, tokenizer, cfg: TrainConfig) -> str:
    """A short sample, outside the training autocast: on CUDA the decoder captures its step as a CUDA
    graph and keeps it on the model for later generations, which should not inherit bf16 compute."""
    model.eval()
    text = "".join(stream_text(model, tokenizer, cfg.sample_prompt,
                               SamplingConfig(max_new_tokens=min(64, model.config.block_size // 2),
                                              temperature=0.8, top_k=50, seed=cfg.seed)))
    model.train()
    return text


def main(model_cls, presets: dict, default_tokenizer: str, argv: list[str] | None = None,
         defaults: dict | None = None) -> dict:
    """The body of every model's trainer.py: flags -> configs -> train."""
    from smolhub.config import parse_cli

    mcfg, cfg = parse_cli((model_cls.config_class, TrainConfig), presets, argv, defaults=defaults,
                          prog=f"{model_cls.__name__}/trainer.py", description=f"Train {model_cls.__name__}.")
    result = train(model_cls, mcfg, cfg, default_tokenizer)
    if int(os.environ.get("RANK", 0)) == 0:
        val = f"{result['val_loss']:.4f}" if result["val_loss"] is not None else "n/a"
        print(f"done: step {result['step']}, {result['tokens_seen']:,} tokens, val loss {val}, "
              f"checkpoints in {result['out_dir']}")
    return result
