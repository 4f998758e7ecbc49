"""Throughput of the OpenAI-compatible server (smolhub.serve) by number of concurrent clients.

The server runs in this process (uvicorn in a thread, the decode loop in another); the clients run in
other processes (--client_processes of them, each an asyncio loop of httpx streaming requests reading
server-sent events), as real clients do: parsing their streams costs the server nothing. Each level
runs C clients, each sending its share of the level's requests one after the other (1 client: one at a
time, the baseline); every request asks for --max_tokens tokens of the same prompt at temperature 1.0
with a seed of its own. OpenAI's API has no "ignore EOS": a random-init model (--model) almost never
samples EOS, and every figure counts the tokens each response's usage reports, so an early stop does not
inflate them. Reported: aggregate completion tokens/s (all tokens / wall time of the level, from the
first request sent to the last response read), the time to first token (request sent -> first text
chunk), median and p90, and the CPU time this server process spent per token (all its threads; the
decode loop's share apart). Each level is warmed up first with a short burst at that concurrency (it
captures the CUDA graphs of its batch sizes).

    python -m benchmarks.serve --model StoryLlama --json benchmarks/results/serve.json
    python -m benchmarks.serve --checkpoint out/StoryLlama-dpo
    python -m benchmarks.serve --model StoryLlama --config n_layer=1 n_embd=64 n_head=2 n_kv_heads=1  # server overhead
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
from pathlib import Path

import httpx
import torch

from smolhub.generate import Engine
from smolhub.inference import load_model, pick_device
from smolhub.serve.api import BackgroundServer, create_app

GPT2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"


def random_engine(name: str, tokenizer_dir: str, device: str, compile: bool, overrides: dict) -> Engine:
    """A model at its default size (or with `overrides` of its config) with random weights and GPT-2's
    tokenizer: speed only."""
    from benchmarks.common import ours
    from smolhub.config import pad_vocab
    from smolhub.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    dev = pick_device(device)
    model = ours(name, pad_vocab(len(tokenizer)), **overrides)().to(dev)
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)
    return Engine(model.eval(), tokenizer, compile)


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, float, int]:
    """(sent, first text, done, completion tokens) of one streamed completion; times from perf_counter,
    one clock for every process of this machine."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return start, first if first is not None else end, end, tokens


async def run_clients(url: str, model: str, clients: list[int], n_clients: int, requests: int, max_tokens: int,
                      prompt: str) -> list[tuple[float, float, float, int]]:
    """Clients `clients` of a level of n_clients, concurrently: client c sends requests c, c + n_clients, ..."""
    limits = httpx.Limits(max_connections=len(clients), max_keepalive_connections=len(clients))
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client(c: int) -> list[tuple[float, float, float, int]]:
            out = []
            for i in range(c, requests, n_clients):
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                        "seed": i, "stream": True, "stream_options": {"include_usage": True}}
                out.append(await one_request(http, url, body))
            return out

        return [r for rs in await asyncio.gather(*(client(c) for c in clients)) for r in rs]


def client_process(conn) -> None:
    """A load-generating process: runs each share of a level it is sent, until it is sent None."""
    while (job := conn.recv()) is not None:
        conn.send(asyncio.run(run_clients(**job)))


class Clients:
    """`processes` client processes, started once; level() spreads a level's clients over them."""

    def __init__(self, processes: int):
        context = multiprocessing.get_context("spawn")  # no copy of this process's threads or CUDA state
        self.conns, self.procs = [], []
        for _ in range(processes):
            parent, child = context.Pipe()
            proc = context.Process(target=client_process, args=(child,), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def level(self, url: str, model: str, clients: int, requests: int, max_tokens: int, prompt: str) -> list:
        used = self.conns[:clients]
        for p, conn in enumerate(used):
            conn.send(dict(url=url, model=model, clients=list(range(p, clients, len(used))), n_clients=clients,
                           requests=requests, max_tokens=max_tokens, prompt=prompt))
        return [r for conn in used for r in conn.recv()]

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            conn.send(None)
            proc.join()


def thread_cpu(thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def level(clients: Clients, scheduler, url: str, model: str, n_clients: int, requests: int, max_tokens: int,
          prompt: str) -> dict:
    """`requests` completions from `n_clients` concurrent clients, each sending its share in turn."""
    cpu, decode_cpu = time.process_time(), thread_cpu(scheduler.thread)
    results = clients.level(url, model, n_clients, requests, max_tokens, prompt)
    cpu, decode_cpu = time.process_time() - cpu, thread_cpu(scheduler.thread) - decode_cpu
    elapsed = max(r[2] for r in results) - min(r[0] for r in results)
    ttft = sorted(r[1] - r[0] for r in results)
    tokens = sum(r[3] for r in results)
    return {"clients": n_clients, "requests": requests, "tokens": tokens, "seconds": elapsed,
            "tok_per_s": tokens / elapsed, "ttft_median_ms": 1000 * statistics.median(ttft),
            "ttft_p90_ms": 1000 * ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
            "server_cpu_us_per_token": 1e6 * cpu / tokens, "decode_loop_cpu_us_per_token": 1e6 * decode_cpu / tokens}


def config_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--config takes KEY=VALUE pairs, got {pair!r}")
        out[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="A checkpoint to serve.")
    source.add_argument("--model", help="An architecture at its default size, random weights (speed only).")
    p.add_argument("--tokenizer", default=str(GPT2), help="GPT-2 tokenizer folder for --model.")
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="--model: config fields other than the default size, e.g. n_layer=1 n_embd=64.")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--client_processes", type=int, default=4,
                   help="Processes the clients are spread over (at most one per client).")
    p.add_argument("--requests", type=int, default=32,
                   help="Requests per level (at least 2 per client); the 1-client level is the one-at-a-time baseline.")
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--prompt", default="Once upon a time there was a little girl who")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="Compile the decode step (load_model(compile=True)).")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.checkpoint and args.config:
        raise SystemExit("--config applies to --model only")
    if args.checkpoint:
        engine = load_model(args.checkpoint, args.device, compile=args.compile)
        name = Path(args.checkpoint.rstrip("/")).name
    else:
        engine = random_engine(args.model, args.tokenizer, args.device, args.compile, config_overrides(args.config))
        name = args.model
    rows = []
    app = create_app(engine, name, max(args.clients))
    clients = Clients(min(max(args.client_processes, 1), max(args.clients)))
    try:
        with BackgroundServer(app) as server:
            url = server.url + "/v1/completions"
            scheduler = app.state.scheduler
            for n in args.clients:
                level(clients, scheduler, url, name, n, n, 8, args.prompt)  # warm-up: this level's batch sizes
                rows.append(level(clients, scheduler, url, name, n, max(args.requests, 2 * n), args.max_tokens,
                                  args.prompt))
                print(f"{n} clients: {rows[-1]['tok_per_s']:,.0f} tok/s", flush=True)
            max_batch_seen = scheduler.max_batch_seen
    finally:
        clients.close()
    base = next((r["tok_per_s"] for r in rows if r["clients"] == 1), None)
    device = torch.cuda.get_device_name() if next(engine.model.parameters()).is_cuda else "cpu"
    print(f"\n{name} on {device}, {args.max_tokens} tokens per request, most requests in one step: {max_batch_seen}, "
          f"clients in {len(clients.procs)} other processes\n")
    print("| clients | requests | tokens | tok/s | vs one at a time | TTFT median (ms) | TTFT p90 (ms) "
          "| server CPU µs/token | decode loop µs/token |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['tok_per_s'] / base:.1f}x" if base else "-"
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['tok_per_s']:,.0f} | {ratio} | "
              f"{r['ttft_median_ms']:.0f} | {r['ttft_p90_ms']:.0f} | {r['server_cpu_us_per_token']:.0f} | "
              f"{r['decode_loop_cpu_us_per_token']:.0f} |")
    at16 = next((r["tok_per_s"] for r in rows if r["clients"] == 16), None)
    if base and at16:
        print(f"\n16 concurrent clients: {at16 / base:.1f}x the one-at-a-time throughput (goal >= 8x)")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": name, "device": device, "max_tokens": args.max_tokens,
                                   "compile": args.compile, "config": args.config,
                                   "client_processes": len(clients.procs), "max_batch_seen": max_batch_seen,
                                   "levels": rows}, indent=2))
        tmp.replace(out)


if __name__ == "__main__":
    main()
