"""Model quality at equal tokens: each SmolHub model and the transformers model of the same shape,
trained on the same token stream in the same order with the same optimizer settings and schedule.

Both sides use SmolHub's data pipeline (one tokenisation, one PackedLoader order per seed), AdamW
with weight decay on 2-D weights, warmup + cosine, bf16 autocast, torch.compile on CUDA, and the same
initialisation scheme (GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2L),
applied to the transformers model too). The transformers side gets its own auxiliary losses
(Mixtral's load balancing); StoryKimi runs twice, with Muon (its default) and with AdamW.

    python -m benchmarks.quality --data path/to/gutenberg --gpt2 path/to/gpt2 --tokens 10M --out results/

Writes results.json (one entry per model, so runs of different models can be split over several
invocations), a loss-curve PNG per pair, three samples from each trained SmolHub model and a table. On CPU (`--device cpu`) it runs the
same code at toy sizes, which the test suite uses so that it cannot rot.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import gpt2_as_smoltransformer, load_ours_into_twin, pairs
from smolhub.config import TrainConfig
from smolhub.data import PackedLoader, iter_documents, prepare_dataset
from smolhub.data.__main__ import parse_count
from smolhub.data.sources import dataset_identity
from smolhub.generate import SamplingConfig, generate_batch
from smolhub.modeling import model_class
from smolhub.objectives import NextTokenPrediction, Objective
from smolhub.optim import adamw_param_groups, build_optimizer, build_scheduler
from smolhub.runtime import Runtime
from smolhub.tokenizer import build_tokenizer, gpt2_tokenizer
from smolhub.train import evaluate

GPT2_MODELS = {"SmolTransformer", "StoryLlama"}
SAMPLE_PROMPTS = ["It was a dark and stormy night, and", "The old man looked at the sea and said",
                  "Chapter I. In the year 1800,"]
RESIDUAL_SUFFIXES = ("o_proj.weight", "down_proj.weight", "c_proj.weight", "down_proj")


def init_like_ours(model: torch.nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 init on a transformers model, matching CausalLM.init_weights."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            scale = 1 / math.sqrt(2 * n_layer) if name.endswith(RESIDUAL_SUFFIXES) else 1.0
            p.normal_(0.0, std * scale)


class HFSide(torch.nn.Module):
    """A transformers causal LM seen through SmolHub's training interface: (None, loss) from (x, y)."""

    def __init__(self, hf: torch.nn.Module, aux_weight: float):
        super().__init__()
        self.hf, self.aux_weight = hf, aux_weight

    def forward(self, x, y):
        out = self.hf(input_ids=x)
        loss = F.cross_entropy(out.logits.float().view(-1, out.logits.size(-1)), y.reshape(-1))
        aux = getattr(out, "aux_loss", None)
        return None, loss if aux is None else loss + self.aux_weight * aux


class ForwardLoss(Objective):
    """The objective of the transformers twins, which have no aux_loss hook: their forward's loss."""

    def __call__(self, step_model, batch):
        _, loss = step_model(*batch)
        return loss, {"loss": loss.detach()}


def train_one(label: str, model: torch.nn.Module, is_ours: bool, optimizer: str, data, args, seq_len: int,
              batch: int, steps: int, seed: int, device: torch.device) -> dict:
    cfg = TrainConfig(lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, steps // 20), max_steps=steps,
                      weight_decay=0.1, optimizer=optimizer)
    model.to(device).train()
    if is_ours:
        opt = build_optimizer(model, cfg, device.type)
    else:
        opt = torch.optim.AdamW(adamw_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                fused=device.type == "cuda")
    sched = build_scheduler(opt, cfg)
    fwd = torch.compile(model) if device.type == "cuda" and not args.no_compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    loader = PackedLoader(data.train_shards, data.dtype, batch, seq_len, seed=seed)
    runtime = Runtime(rank=0, local_rank=0, world_size=1, device=device)

    def val_loader():
        return PackedLoader(data.val_shards, data.dtype, batch, seq_len, shuffle=False)
    objective = NextTokenPrediction(model) if is_ours else ForwardLoss()
    eval_every = max(1, steps // args.evals)
    curve, t_train = [], 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp:
            _, loss = fwd(x, y)
            aux = model.aux_loss() if is_ours else None
            total = loss if aux is None else loss + aux
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if is_ours:
            model.after_optimizer_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 2:  # the first steps compile
            t_train += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            val = evaluate(fwd, objective, val_loader, args.eval_batches, amp, runtime)["val_loss"]
            curve.append({"step": step, "tokens": step * batch * seq_len, "train_loss": loss.item(), "val_loss": val})
            print(f"  {label:<34} step {step:>5}/{steps}  train {loss.item():.4f}  val {val:.4f}", flush=True)
    timed_tokens = (steps - 2) * batch * seq_len
    return {"label": label, "val_loss": curve[-1]["val_loss"], "curve": curve, "train_s": t_train,
            "tok_per_s": timed_tokens / t_train if t_train > 0 else float("nan"),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def prepare(name: str, args, cache: Path):
    if name in GPT2_MODELS:
        tokenizer = gpt2_tokenizer(args.gpt2)
    else:
        tokenizer = build_tokenizer("bpe", texts=lambda: iter_documents(args.data), bpe_vocab_size=args.bpe_vocab,
                                    cache_dir=str(cache), cache_key=dataset_identity(args.data))
    data = prepare_dataset(args.data, tokenizer, str(cache), max_tokens=args.tokens + args.tokens // 10,
                           num_proc=args.num_proc)
    return tokenizer, data


def build_pair(name: str, vocab: int, args):
    """(our model, transformers model) of one shape; --tiny shrinks both alike for the CPU test."""
    pair = pairs()[name]
    cls = model_class(name)
    overrides = {}
    if args.tiny:
        overrides = dict(n_layer=2, n_embd=64, n_head=4, block_size=64)
        fields = cls.config_class.__dataclass_fields__
        for key, value in dict(n_kv_heads=2, ffn_hidden=128, expert_hidden=64, kv_lora_rank=16,
                               qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, sliding_window=32).items():
            if key in fields:
                overrides[key] = value
    ours = cls(cls.config_class(vocab_size=vocab, bf16_residual=not getattr(args, "fp32_residual", False),
                                **overrides))
    return ours, pair.build_baseline(ours.config), (64 if args.tiny else pair.seq_len)


def plot(rows: list[dict], name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot([c["tokens"] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], "o-", markersize=3,
                label=f"{r['label']} ({r['val_loss']:.3f})")
    ax.set_xlabel("tokens")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"{name}: held-out books")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_results(path: Path, result: dict) -> None:
    """Add one model's runs to results.json (replacing an earlier entry of that model), via a temp file."""
    saved = json.loads(path.read_text()) if path.exists() else []
    saved = [r for r in saved if r["model"] != result["model"]] + [result]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Folder of train*.txt(.gz) + valid*.txt(.gz) (the Gutenberg books).")
    p.add_argument("--gpt2", required=True, help="Folder with GPT-2's vocab.json + merges.txt.")
    p.add_argument("--models", nargs="+", default=["SmolTransformer", "StoryLlama", "SmolMixtral", "StoryMixtral",
                                                    "StoryKimi"])
    p.add_argument("--tokens", type=parse_count, default=parse_count("10M"), help="Training tokens per run.")
    p.add_argument("--tokens_per_step", type=int, default=32768)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--evals", type=int, default=10, help="Validation points per run.")
    p.add_argument("--eval_batches", type=int, default=20)
    p.add_argument("--bpe_vocab", type=int, default=32000)
    p.add_argument("--num_proc", type=int, default=8)
    p.add_argument("--noise_seeds", type=int, default=2, help="Seeds of our first model, to measure run-to-run noise.")
    p.add_argument("--sample_tokens", type=int, default=60, help="Length of the samples written after training.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no_compile", action="store_true", help="Eager on CUDA too (quicker to start; tok/s then "
                   "measures eager mode).")
    p.add_argument("--fp32_residual", action="store_true", help="Carry our models' residual stream in fp32 "
                   "(bf16_residual=False), as the twins do, instead of their default.")
    p.add_argument("--same_init", action="store_true", help="Start the twin from our model's initial weights "
                   "(exported into it; GPT-2's biases zero, its LayerNorm gains one) rather than from its own draw "
                   "of the same init: the pair then differs only in architecture details and numerics, not in "
                   "the init draw.")
    p.add_argument("--gpt2_as_ours", action="store_true", help="SmolTransformer: also train its GPT-2 twin with "
                   "RMSNorm for its LayerNorms and its biases held at zero, SmolTransformer's function, so that the "
                   "gap to GPT-2 splits into what the architecture costs and what the implementation costs (with "
                   "--same_init that twin starts from our weights).")
    p.add_argument("--tiny", action="store_true", help="Toy sizes (the CPU test).")
    p.add_argument("--out", default="quality_results")
    args = p.parse_args(argv)
    if args.gpt2_as_ours and "SmolTransformer" not in args.models:
        p.error("--gpt2_as_ours changes SmolTransformer's twin: add SmolTransformer to --models or drop the flag")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for i, name in enumerate(args.models):
        tokenizer, data = prepare(name, args, out / "cache")
        vocab = (len(tokenizer) + 63) // 64 * 64
        runs = []
        sides = [("ours", "adamw" if name != "StoryKimi" else "muon", 0)]
        if name == "StoryKimi":
            sides.append(("ours", "adamw", 0))
        if i == 0:
            sides += [("ours", sides[0][1], s) for s in range(1, args.noise_seeds)]
        sides.append(("hf", "adamw", 0))
        if args.gpt2_as_ours and name == "SmolTransformer":
            sides.append(("hf as ours", "adamw", 0))
        for side, optimizer, seed in sides:
            torch.manual_seed(1337 + seed)
            ours, hf, seq_len = build_pair(name, vocab, args)
            batch = max(1, args.tokens_per_step // seq_len)
            steps = max(3, args.tokens // (batch * seq_len))
            if side == "ours":
                label = (f"SmolHub {name} ({optimizer}{', fp32 residual' if args.fp32_residual else ''}"
                         f"{', seed ' + str(seed) if seed else ''})")
                model, is_ours = ours, True
            else:
                if side == "hf as ours":
                    gpt2_as_smoltransformer(hf, ours.config.norm_eps)
                if args.same_init:
                    load_ours_into_twin(name, ours, hf)
                else:
                    init_like_ours(hf, ours.config.n_layer)
                label = (pairs()[name].baseline_name + (" as ours (RMSNorm, no biases)" if side == "hf as ours" else "")
                         + (" (our init)" if args.same_init else ""))
                model, is_ours = HFSide(hf, getattr(hf.config, "router_aux_loss_coef", 0.0)), False
            if side == "ours":
                del hf
            else:
                del ours
            runs.append(train_one(label, model, is_ours, optimizer, data, args, seq_len, batch, steps, 1337 + seed,
                                  device))
            if len(runs) == 1:  # our model with its default optimizer: what it writes after training
                model.eval()
                cfg = SamplingConfig(max_new_tokens=args.sample_tokens, temperature=0.8, top_k=50, seed=0)
                runs[0]["samples"] = [{"prompt": p, "text": t} for p, t in
                                      zip(SAMPLE_PROMPTS, generate_batch(model, tokenizer, SAMPLE_PROMPTS, cfg))]
            del model
            if device.type == "cuda":
                torch._dynamo.reset()
                torch.cuda.empty_cache()
        plot(runs, name, out / f"quality_{name}.png")
        results.append({"model": name, "tokens": runs[0]["curve"][-1]["tokens"], "runs": runs})
        save_results(out / "results.json", results[-1])
    print(f"\n{'model':<16}{'run':<38}{'tokens':>11}{'val loss':>10}{'tok/s':>11}{'GiB':>7}")
    for r in results:
        for run in r["runs"]:
            gib = f"{run['peak_gib']:.1f}" if run["peak_gib"] is not None else "-"
            print(f"{r['model']:<16}{run['label']:<38}{r['tokens']:>11,}{run['val_loss']:>10.4f}"
                  f"{run['tok_per_s']:>11,.0f}{gib:>7}")
    return results


if __name__ == "__main__":
    main()
