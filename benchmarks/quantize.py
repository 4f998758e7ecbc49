"""Quantized inference (smolhub.quantize, torchao) per model and setting: weights memory, peak memory
while decoding, batch-1 and batch-16 decode tokens/s, and bits per byte on held-out text.

Checkpoints load through load_model(path, quantize=...), as inference.py does; --models builds each
model at its full default size with random weights (speed and memory only, no bits per byte).
Decoding is Engine.generate_ids, greedy, a random prompt of --prompt_len tokens and --new_tokens
new ones (EOS ignored), one untimed call first (on CUDA it captures the decoder's graph), then the
median of --repeats timed calls. Peak decode memory: on CUDA torch.cuda.max_memory_allocated over
the decode calls, warm-up included (weights, KV cache, CUDA graph, activations); on CPU each setting
runs in a fresh process and the figure is its resident-set high-water mark over the decode calls
(VmHWM, reset first through /proc/self/clear_refs), which includes the ~0.4 GiB of torch itself.
Bits per byte are
smolhub.eval's evaluate_text on the last --val_fraction of --text (its first --eval_tokens targets),
with the change against the same model's "none" run. A setting the device cannot run is a row that
says why.

    python -m benchmarks.quantize --checkpoints /tmp/q/StoryLlama --device cuda --text input.txt --out q.json
    python -m benchmarks.quantize --models StoryLlama SmolMixtral --device cpu --out q-cpu.json
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing
import re
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch

from smolhub.errors import UserError
from smolhub.files import write_json
from smolhub.generate import Engine, SamplingConfig
from smolhub.quantize import QUANTIZE_CHOICES, quantize_model, weights_bytes

MIB = 2 ** 20


def build(source: str, kind: str, setting: str, device: torch.device, dtype: torch.dtype) -> Engine:
    if kind == "checkpoint":
        from smolhub.inference import load_model

        return load_model(source, str(device), str(dtype).removeprefix("torch."), quantize=setting)
    from benchmarks.common import pairs

    torch.manual_seed(0)
    model = pairs()[source].build_ours().to(device, dtype).eval()
    quantize_model(model, setting)
    return Engine(model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what quantizing freed, so it is not counted
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again from the current resident set


def _peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / MIB if device.type == "cuda" else _vm_hwm_mib()


def decode_speed(engine: Engine, batch: int, args, device: torch.device) -> float:
    vocab = engine.model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, args.prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0, stop_at_eos=False)
    list(engine.generate_ids(prompt, cfg))  # warm-up: the CUDA graph's capture, lazy inits
    times = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        list(engine.generate_ids(prompt, cfg))
        _sync(device)
        times.append(time.perf_counter() - start)
    return batch * args.new_tokens / statistics.median(times)


def measure(source: str, kind: str, setting: str, args) -> dict:
    """One model at one setting: the row of the table, or a row saying why the setting failed."""
    row = {"model": Path(source).name if kind == "checkpoint" else source, "setting": setting}
    try:
        return _measure(row, source, kind, setting, args)
    except UserError as e:
        return {**row, "error": str(e)}
    except Exception as e:  # a kernel that fails on this device: the other settings still run
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


def _measure(row: dict, source: str, kind: str, setting: str, args) -> dict:
    device, dtype = torch.device(args.device), resolve_dtype(args)
    engine = build(source, kind, setting, device, dtype)
    row["weights_mib"] = weights_bytes(engine.model) / MIB
    _reset_peak(device)
    speeds = {batch: decode_speed(engine, batch, args, device) for batch in args.batches}
    row["peak_decode_mib"] = _peak_mib(device)
    row.update({f"tok_per_s_b{batch}": speed for batch, speed in speeds.items()})
    row["bpb"] = None
    if kind == "checkpoint" and args.text:
        from smolhub.eval.intrinsic import evaluate_text

        result = evaluate_text(engine, args.text, data_dir=args.data_dir, max_tokens=args.eval_tokens,
                               batch_size=args.eval_batch_size, val_fraction=args.val_fraction)
        row["bpb"] = result["bpb"]
        row["eval_tokens"] = result["tokens"]
    return row


def measure_in_fresh_process(source: str, kind: str, setting: str, args) -> dict:
    """measure() in a process of its own: a CPU's resident set then holds this setting's model alone."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (source, kind, setting, args))


def resolve_dtype(args) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return getattr(torch, args.dtype)


def add_changes(rows: list[dict]) -> None:
    """Each row's bits per byte against its model's unquantized row."""
    base = {r["model"]: r["bpb"] for r in rows if r["setting"] == "none" and r.get("bpb") is not None}
    for r in rows:
        if r.get("bpb") is not None and r["model"] in base:
            r["bpb_change"] = r["bpb"] - base[r["model"]]


def markdown_table(rows: list[dict], batches: list[int]) -> str:
    def num(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    head = (["model", "setting", "weights MiB", "peak decode MiB"] + [f"tok/s B={b}" for b in batches]
            + ["bpb", "Δ bpb"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            cells = [r["model"], r["setting"], f"failed: {r['error']}"] + [""] * (len(head) - 3)
        else:
            cells = ([r["model"], r["setting"], num(r["weights_mib"], ".1f"), num(r["peak_decode_mib"], ".0f")]
                     + [num(r[f"tok_per_s_b{b}"], ",.0f") for b in batches]
                     + [num(r["bpb"], ".4f"), num(r.get("bpb_change"), "+.4f")])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = p.add_mutually_exclusive_group(required=True)
    sources.add_argument("--checkpoints", nargs="+", help="Checkpoint folders or run out_dirs.")
    sources.add_argument("--models", nargs="+", help="Model names, built at their full default size, random weights.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="Weights dtype before quantizing; auto = bf16 on CUDA, fp32 on CPU.")
    p.add_argument("--settings", nargs="+", default=list(QUANTIZE_CHOICES), choices=QUANTIZE_CHOICES)
    p.add_argument("--text", default="", help="Held-out text for bits per byte (checkpoints only).")
    p.add_argument("--val_fraction", type=float, default=0.1, help="The end of --text scored.")
    p.add_argument("--eval_tokens", type=int, default=32768, help="Targets scored (whole windows).")
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--data_dir", default="data_cache", help="Tokenized --text, shared with the trainer's cache.")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="", help="Write the rows as JSON here.")
    args = p.parse_args(argv)
    kind, names = ("checkpoint", args.checkpoints) if args.checkpoints else ("model", args.models)
    one = measure_in_fresh_process if args.device == "cpu" else measure
    rows = []
    for name in names:
        for setting in args.settings:
            row = one(name, kind, setting, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    add_changes(rows)
    record = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "dtype": str(resolve_dtype(args)).removeprefix("torch."), "torch": torch.__version__,
              "torchao": version("torchao"), "threads": torch.get_num_threads(),
              "peak_decode_memory": ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda")
                                     else "process VmHWM (resident set high-water mark)"),
              "args": vars(args), "rows": rows}
    print()
    print(markdown_table(rows, args.batches))
    if args.out:
        write_json(args.out, record)


if __name__ == "__main__":
    main()
