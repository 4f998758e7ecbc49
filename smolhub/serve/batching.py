"""Continuous batching: every request in flight is decoded in one batch, one token per step.

A background thread owns the model. A new request is prefilled alone into a batch-1 KV cache, which
is copied into a free row of the batch's cache (a cache's state is the tensors in vars(cache), batch
first); from the next step it decodes with the others, each row at its own position (start_pos is a
(B,) tensor). A row is freed when its request ends: a stop token, max_tokens, or `cancelled` set by
the caller (a client gone, a stop string matched), seen at the next step.

A step decodes the rows up to the highest one in use, rounded up to a bucket (1, 2, 4, ... max_batch):
on CUDA each bucket's step, model and sampling, is captured once as a CUDA graph (after torch.compile of
the model with compile=True); on CPU it runs eagerly. The loop launches step t before it hands out the
tokens of step t - 1, so that on CUDA the device never waits for the host's bookkeeping.

Sampling is per row (temperature, top_k, top_p) and draws its randomness from a counter-based hash of
the request's key and the token's index, not from a shared generator: a request's tokens are the same
alone and among others, and all rows sample in the same few batched kernels (Gumbel-max).
"""
from __future__ import annotations

import copy
import logging
import queue
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.attention import sdpa_kernel

from smolhub.errors import UserError
from smolhub.generate import GENERATION_ATTENTION, Engine
from smolhub.modeling import copy_cache_row

log = logging.getLogger(__name__)

_M32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash (Wellons' lowbias32 constants, both < 2^31 so that every product fits
    an int64): for Python ints and int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def request_key(seed: int, index: int) -> int:
    """The 32-bit key of the random stream of choice `index` of a request with this seed (any int)."""
    seed &= (1 << 64) - 1
    return mix32(mix32(seed & _M32) ^ mix32((seed >> 32) ^ mix32(index & _M32)))


@dataclass(eq=False)
class Request:
    """One sequence to generate: the prompt's ids, at most max_tokens new ones, its sampling settings and
    key (request_key), and the ids that end it (EOS, a chat's end of turn). `cancelled` may be set from
    any thread; the scheduler frees the row at its next step."""

    ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    key: int = 0
    stop_ids: frozenset[int] = frozenset()
    sink: object = None  # where the caller collects this request's events
    cancelled: bool = False
    error: str = ""
    n_generated: int = field(default=0, init=False)


# what a request's consumer receives, in order: (request, token, finish) with finish None until the
# last token ("stop": a stop id, "length": max_tokens), or (request, None, "error") with request.error set
Event = tuple[Request, "int | None", "str | None"]


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                key: torch.Tensor, counter: torch.Tensor, sampling: bool, truncating: bool) -> torch.Tensor:
    """logits (B, V) float -> next ids (B,), each row with its own settings ((B,) tensors; temperature 0
    is greedy, top_k 0 and top_p 1 are off). Row b's noise depends on key[b] and counter[b] (its token's
    index) alone. `sampling`: some row has temperature > 0; `truncating`: some row uses top_k or top_p."""
    greedy = logits.argmax(dim=-1)
    if not sampling:
        return greedy
    V = logits.size(-1)
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    if truncating:
        ranked, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=logits.device)
        cut = rank >= torch.where(top_k > 0, top_k, V)[:, None]
        ranked = ranked.masked_fill(cut, float("-inf"))
        probs = ranked.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        cut |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        scaled = scaled.scatter(-1, order, ranked.masked_fill(cut, float("-inf")))
    stream = mix32(key ^ mix32(counter))
    bits = mix32(stream[:, None] ^ mix32(torch.arange(V, device=logits.device)))
    uniform = ((bits >> 8).float() + 0.5) * 2.0 ** -24
    sampled = (scaled - torch.log(-torch.log(uniform))).argmax(dim=-1)  # Gumbel-max: a draw from softmax(scaled)
    return torch.where(temperature > 0, sampled, greedy)


def buckets(max_batch: int) -> list[int]:
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(min(2 * sizes[-1], max_batch))
    return sizes


class Scheduler:
    """The decode loop, in a thread of its own: submit() Requests from any thread; `emit` receives a list
    of Events from the loop's thread after each step (and after each request's first token).

    `max_batch_seen` is the most requests one decode step has carried."""

    def __init__(self, engine: Engine, emit: Callable[[list[Event]], None], max_batch: int = 64):
        capacity = getattr(engine.model.config, "capacity_factor", 0)
        if capacity > 0 and max_batch > 1:
            raise UserError(f"this checkpoint drops tokens over an expert's capacity (capacity_factor {capacity}), so "
                            "a request's reply would depend on the requests decoded with it: serve it with --max_batch 1")
        self.engine = engine
        self.emit = emit
        self.max_batch = max_batch
        model = engine.model
        self.block_size = model.config.block_size
        self.n_vocab = len(engine.tokenizer)  # padding ids beyond it are never sampled
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = model.make_kv_cache(max_batch, self.block_size, self.device, self.dtype)
        self.prefill_cache = model.make_kv_cache(1, self.block_size, self.device, self.dtype)
        self.buckets = buckets(max_batch)
        self.views = {b: [self._rows_view(layer, b) for layer in self.cache] for b in self.buckets}
        zeros = dict(device=self.device, dtype=torch.long)
        self.tokens = torch.zeros(max_batch, 1, **zeros)  # each row's last token, the next step's input
        self.pos = torch.zeros(max_batch, **zeros)  # its position
        self.active = torch.zeros(max_batch, **zeros)  # 1 where a request holds the row
        self.counter = torch.zeros(max_batch, **zeros)  # tokens the row's request has sampled
        self.key = torch.zeros(max_batch, **zeros)
        self.top_k = torch.zeros(max_batch, **zeros)
        self.temperature = torch.zeros(max_batch, device=self.device)
        self.top_p = torch.ones(max_batch, device=self.device)
        pinned = self.device.type == "cuda"
        self.host_tokens = [torch.zeros(max_batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.rows: list[Request | None] = [None] * max_batch
        self.inbox: queue.Queue[Request | None] = queue.Queue()
        self.graphs: dict[tuple[int, bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.use_graphs = self.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.forward = self._compiled_forward() if engine.compile else self._forward
        self.max_batch_seen = 0
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="smolhub-decode", daemon=True)

    def start(self) -> Scheduler:
        self.thread.start()
        return self

    def submit(self, request: Request) -> None:
        self.inbox.put(request)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join()

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    @staticmethod
    def _rows_view(layer, b: int):
        """The cache object of one layer restricted to its first b rows (views: the same memory)."""
        view = copy.copy(layer)
        for name, t in vars(layer).items():
            setattr(view, name, t[:b])
        return view

    def _compiled_forward(self):
        # shapes are fixed per bucket: one compiled graph each, which the CUDA graph then captures
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.buckets) + 1)
        return torch.compile(self._forward, fullgraph=True, dynamic=False)

    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        return self.engine.model(tokens, kv_cache=cache, start_pos=pos)[0][:, -1, :]

    def _next_tokens(self, b: int, sampling: bool, truncating: bool) -> torch.Tensor:
        """The next token (b,) of the first b rows; changes nothing but their keys/values in the cache."""
        logits = self.forward(self.tokens[:b], self.pos[:b], self.views[b])
        return self._sample(logits, slice(0, b), sampling, truncating)

    def _decode(self, b: int, sampling: bool, truncating: bool) -> torch.Tensor:
        """One step of the first b rows: their next tokens, which also become the rows' next input, their
        positions and counters advanced. On CUDA each (b, sampling, truncating) step is one CUDA graph, model
        and sampling together: one launch, and nothing for the host to do until the tokens are needed."""
        if self.use_graphs:
            try:
                kind = (b, sampling, truncating)
                if kind not in self.graphs:
                    self.graphs[kind] = self._capture(*kind)
                graph, tokens = self.graphs[kind]
                graph.replay()
                return tokens
            except Exception as e:  # a model that cannot be captured still decodes, eagerly
                warnings.warn(f"CUDA-graph decoding failed, decoding eagerly from now on: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}")
                self.use_graphs = False
        with sdpa_kernel(GENERATION_ATTENTION):
            tokens = self._next_tokens(b, sampling, truncating)
        self._advance(b, tokens)
        return tokens

    def _advance(self, b: int, tokens: torch.Tensor) -> None:
        self.tokens[:b, 0] = tokens
        self.pos[:b] += self.active[:b]
        self.counter[:b] += self.active[:b]

    def _capture(self, b: int, sampling: bool, truncating: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # the warm-up steps (compilation, cuBLAS workspaces) run on a side stream, as capture requires;
        # they compute the real step without advancing it, so writing its keys/values once more is harmless
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), sdpa_kernel(GENERATION_ATTENTION):
            for _ in range(2):
                self._next_tokens(b, sampling, truncating)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), sdpa_kernel(GENERATION_ATTENTION):
            tokens = self._next_tokens(b, sampling, truncating)
            self._advance(b, tokens)
        return graph, tokens

    def _sample(self, logits: torch.Tensor, rows: slice, sampling: bool, truncating: bool) -> torch.Tensor:
        return sample_rows(logits[:, :self.n_vocab].float(), self.temperature[rows], self.top_p[rows],
                           self.top_k[rows], self.key[rows], self.counter[rows], sampling, truncating)

    @staticmethod
    def _modes(requests: list[Request]) -> tuple[bool, bool]:
        """(sampling, truncating) of sample_rows for these requests."""
        return (any(r.temperature > 0 for r in requests),
                any(r.temperature > 0 and (r.top_k > 0 or r.top_p < 1) for r in requests))

    def _finish(self, request: Request, token: int) -> str | None:
        request.n_generated += 1
        if token in request.stop_ids:
            return "stop"
        return "length" if request.n_generated >= request.max_tokens else None

    def _run(self) -> None:
        """Launch step t, then hand out the tokens of step t - 1: on CUDA the device computes a step while
        the host turns the previous one into events. A row freed in between (its request ended at t - 1,
        or was cancelled) computed one token in step t that nobody receives."""
        pending = None
        with torch.inference_mode():
            while self._admit(wait=pending is None):
                for r, request in enumerate(self.rows):
                    if request is not None and request.cancelled:
                        self._free(r)
                launched = None
                if self.running:
                    launched = self._guarded(self._launch, [r for r in self.rows if r is not None])
                if pending is not None:
                    self._guarded(self._hand_out, [r for r in pending[0] if r is not None], *pending)
                pending = launched

    def _guarded(self, work, requests: list[Request], *args):
        """Run work; should it fail, its requests end with an error and the loop goes on (None)."""
        try:
            return work(*args)
        except Exception as e:
            log.exception("decoding failed")
            for request in requests:
                request.error = f"decoding failed: {type(e).__name__}: {e}"
            self.emit([(request, None, "error") for request in requests])
            for r, request in enumerate(self.rows):
                if request in requests:
                    self._free(r)
            return None

    def _admit(self, wait: bool) -> bool:
        """Move waiting requests into free rows (waiting for one while none is running and `wait`); False
        once closed."""
        while None in self.rows:
            try:
                request = self.inbox.get(block=wait and not self.running)
            except queue.Empty:
                return True
            if request is None:
                return False
            if not request.cancelled:
                self._guarded(self._start, [request], request, self.rows.index(None))
        return True

    def _start(self, request: Request, r: int) -> None:
        """Prefill the prompt alone, sample its first token, and give the request row r."""
        ids = torch.tensor([request.ids], device=self.device)
        with sdpa_kernel(GENERATION_ATTENTION):
            logits = self.engine.model(ids, kv_cache=self.prefill_cache, start_pos=0)[0][:, -1, :]
        for name, value in (("temperature", request.temperature), ("top_p", request.top_p),
                            ("top_k", request.top_k), ("key", request.key), ("counter", 0)):
            getattr(self, name)[r] = value
        token = self._sample(logits, slice(r, r + 1), *self._modes([request]))
        copy_cache_row(self.cache, r, self.prefill_cache)
        self.tokens[r, 0] = token[0]
        self.pos[r] = len(request.ids)
        self.counter[r] = 1
        self.active[r] = 1
        self.rows[r] = request
        t = int(token[0])
        finish = self._finish(request, t)
        self.emit([(request, t, finish)])
        if finish:
            self._free(r)

    def _launch(self) -> tuple[list[Request | None], torch.Tensor, torch.cuda.Event | None]:
        """Start one token for every running request: the requests of the step's rows, and where (and,
        on CUDA, once which event has passed) its tokens will be on the host."""
        used = max(r for r, request in enumerate(self.rows) if request is not None) + 1
        b = next(size for size in self.buckets if size >= used)
        rows = self.rows[:b]
        running = [r for r in rows if r is not None]
        tokens = self._decode(b, *self._modes(running))
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(running))
        host = self.host_tokens[self.steps % 2][:b]  # two: the step in flight and the one handed out
        host.copy_(tokens, non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return rows, host, done

    def _hand_out(self, rows: list[Request | None], host: torch.Tensor, done: torch.cuda.Event | None) -> None:
        """Emit the tokens of a launched step to the requests that still hold their rows."""
        if done is not None:
            done.synchronize()
        events, finished = [], []
        for r, (request, t) in enumerate(zip(rows, host.tolist())):
            if request is None or self.rows[r] is not request:
                continue
            finish = self._finish(request, t)
            events.append((request, t, finish))
            if finish:
                finished.append(r)
        self.emit(events)
        for r in finished:
            self._free(r)

    def _free(self, r: int) -> None:
        self.rows[r] = None
        self.active[r] = 0
        self.pos[r] = 0
