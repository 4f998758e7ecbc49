"""Autoregressive generation with a KV cache: one prefill of the prompt, then one token per step.

Sampling: temperature (0 = greedy), top-k, top-p (nucleus), repetition penalty (CTRL), a stop at EOS
(and, replying in a chat, at the end of the turn), a seed. Padding ids beyond the tokenizer's
vocabulary are never sampled. Each new token is predicted from the last block_size tokens at most,
as nanoGPT's sample.py crops its context: a longer prompt keeps its end, and a generation longer
than the context slides its window along.
An Engine holds a model with what generating from it needs: its tokenizer and its CUDA-graph decoders.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from smolhub import chat
from smolhub.errors import UserError

# cuDNN attention costs ~2 s at its first use in a process (library set-up, one execution plan per
# shape) and ~80 ms for every new sequence length after that (H100), and generation meets a new
# length with every prompt: prefill uses the planless kernels. Training keeps cuDNN, at fixed shapes.
GENERATION_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be positive (1 = off), got {self.repetition_penalty}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) float -> next ids (B,)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class GraphDecoder:
    """One-token decode steps replayed as a CUDA graph: a static KV cache the length of the context,
    the token and position in fixed device buffers, so every step has the same shapes and addresses.

    Python launch overhead dominates small-model decoding (each step is a few hundred tiny kernels),
    so replaying one captured graph per token is what makes batch-1 decoding fast. By default the
    eager step is captured, which takes milliseconds, so the first generation waits for no compiler
    (only for CUDA's one-time kernel loading and library setup). compile=True has torch.compile fuse
    the step first (mode="reduce-overhead"): about twice the tokens/s, paid for by ~20 s of compiling
    in the first call. An Engine keeps its decoders, and their caches, for its later generations."""

    def __init__(self, model, batch_size: int, device: torch.device, dtype: torch.dtype, compile: bool = False):
        self.model = model
        self.in_use = threading.Lock()  # one generation at a time owns the static cache
        self.cache = model.make_kv_cache(batch_size, model.config.block_size, device, dtype)
        if compile:
            for layer in self.cache:  # fixed addresses let the graph read and write the buffers in place
                for buffer in vars(layer).values():
                    if isinstance(buffer, torch.Tensor):
                        torch._dynamo.mark_static_address(buffer)
            self.step = torch.compile(self._forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
        else:
            self.step = self._replay
            self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            self.pos = torch.zeros((), dtype=torch.long, device=device)
            self.graph: torch.cuda.CUDAGraph | None = None

    def _forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(token, kv_cache=self.cache, start_pos=pos)
        return logits[:, -1, :].float()

    def _replay(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits of the next position, in a buffer the next step overwrites."""
        self.token.copy_(token)
        self.pos.copy_(pos)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        # the warm-up steps (cuBLAS workspaces, lazy inits) run on a side stream, as capture requires;
        # they compute the real step, so writing its keys/values into the cache twice is harmless
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(self.token, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward(self.token, self.pos)

    @staticmethod
    def usable(model, device: torch.device) -> bool:
        """CUDA only, for models whose caches take tensor positions."""
        if device.type != "cuda":
            return False
        probe = model.make_kv_cache(1, model.config.block_size, "meta", torch.float32)
        return all(getattr(layer, "static_positions", False) for layer in probe)


def check_unicode(prompt: str) -> None:
    """Refuse a lone surrogate, which no tokenizer can encode: the command line turns bytes that are
    not UTF-8 into them, and a browser can send one."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the prompt is not valid Unicode text (it holds a lone surrogate): "
                        "retype it or paste it from another source") from None


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty: give some text to continue")
    check_unicode(prompt)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if not ids:
        raise UserError("the prompt encodes to no tokens: give some text to continue")
    return ids


class TextStream:
    """The continuation of one prompt (without the prompt), piece by piece as text, ending before a
    stop token; `n_tokens` counts the tokens sampled so far (a piece can hold several, or wait for
    the rest of a UTF-8 character)."""

    def __init__(self, tokens: Iterator[torch.Tensor], tokenizer, stop_ids: Collection[int]):
        self.n_tokens = 0
        self._pieces = self._decode(tokens, tokenizer, stop_ids)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _decode(self, tokens: Iterator[torch.Tensor], tokenizer, stop_ids: Collection[int]) -> Iterator[str]:
        out: list[int] = []
        emitted = ""
        for token in tokens:
            t = int(token[0])
            if t in stop_ids:
                break
            out.append(t)
            self.n_tokens += 1
            text = tokenizer.decode(out)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
                continue
            if len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
        text = tokenizer.decode(out)
        if len(text) > len(emitted):
            yield text[len(emitted):]


class Engine:
    """A model ready to generate: the nn.Module (`model`), its `tokenizer`, what its checkpoint
    records (`meta`: step, tokens_seen, val_loss, dataset...; `path`: the checkpoint folder) and the
    CUDA-graph decoders captured for it. load_model(path) builds one from a checkpoint; the trainer
    wraps the model it is training to write its samples.

    On CUDA the first generation of each batch size captures a decoder (see GraphDecoder) that every
    later one replays; compile=True compiles its step first. Once a capture fails, the engine decodes
    eagerly."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, compile: bool = False, meta: dict | None = None,
                 path: Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.compile = compile
        self.meta = meta if meta is not None else {}
        self.path = path
        self.graph_failed = False
        self._decoders: dict[tuple, GraphDecoder] = {}
        self._decoders_lock = threading.Lock()

    def _acquire_decoder(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> GraphDecoder | None:
        """The decoder for this batch size, locked for the caller; None where CUDA graphs do not apply
        or while another generation (a concurrent request in the demo app, say) is using it."""
        if self.graph_failed or not GraphDecoder.usable(self.model, device):
            return None
        with self._decoders_lock:
            key = (batch_size, device, dtype)
            if key not in self._decoders:
                self._decoders[key] = GraphDecoder(self.model, batch_size, device, dtype, self.compile)
            decoder = self._decoders[key]
        return decoder if decoder.in_use.acquire(blocking=False) else None

    @torch.inference_mode()
    def generate_ids(self, prompt: torch.Tensor, cfg: SamplingConfig, eos_id: int | None = None,
                     vocab_limit: int | None = None, stop_ids: Collection[int] = ()) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (B,), step by step, until max_new_tokens or all rows hit a
        stop token: EOS or one of stop_ids (a chat's end of turn), when cfg.stop_at_eos.

        prompt: (B, T) ids, all rows the same length, cropped to its last block_size tokens (crop_note
        says so to a user). A row that emitted a stop token keeps being padded with that token."""
        if prompt.dim() != 2 or prompt.size(1) == 0:
            raise UserError("the prompt is empty: give at least one token of text")
        prompt = prompt[:, -self.model.config.block_size:]
        decoder = self._acquire_decoder(prompt.size(0), prompt.device, next(self.model.parameters()).dtype)
        try:
            yield from self._decode(prompt, cfg, {eos_id, *stop_ids} - {None}, vocab_limit, decoder)
        finally:
            if decoder is not None:
                decoder.in_use.release()

    def _decode(self, prompt: torch.Tensor, cfg: SamplingConfig, stop_ids: set[int], vocab_limit: int | None,
                decoder: GraphDecoder | None) -> Iterator[torch.Tensor]:
        model = self.model
        block_size = model.config.block_size
        B, T = prompt.shape
        device = prompt.device
        dtype = next(model.parameters()).dtype
        cache = decoder.cache if decoder else model.make_kv_cache(B, min(T + cfg.max_new_tokens, block_size),
                                                                  device, dtype)
        generator = None
        if cfg.seed is not None and cfg.temperature > 0:
            generator = torch.Generator(device=device).manual_seed(cfg.seed)
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
            seen.scatter_(1, prompt, True)
        stops = torch.tensor(sorted(stop_ids), device=device) if cfg.stop_at_eos and stop_ids else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        token = torch.zeros(B, dtype=torch.long, device=device)
        next_logits = self._prefill(prompt, cache)
        context = [prompt]  # its last block_size tokens are what the next token is predicted from
        length = T  # tokens so far; also the position of the next one while the context has room
        pos = torch.tensor(T, device=device) if decoder else T
        for _ in range(cfg.max_new_tokens):
            if vocab_limit is not None and vocab_limit < next_logits.size(-1):
                next_logits = next_logits.clone()
                next_logits[:, vocab_limit:] = float("-inf")
            # a finished row repeats the stop token it emitted (the previous step's token)
            token = torch.where(done, token, sample_next(next_logits, cfg, seen, generator))
            if stops is not None:
                done |= torch.isin(token, stops)
            yield token
            if stops is not None and bool(done.all()):
                return
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            context.append(token[:, None])
            if length < block_size:
                next_logits = self._step(decoder, cache, token[:, None], pos)
                pos = pos + 1
            else:
                # the window slides: every token moves to the position before, and the oldest one no
                # longer shapes the others' keys and values, so nothing cached still holds: the
                # window is prefilled again
                context = [torch.cat(context, dim=1)[:, -block_size:]]
                next_logits = self._prefill(context[0], cache)
            length += 1

    def _prefill(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """Logits after `tokens`, written to the cache from position 0 (whatever it held before)."""
        with sdpa_kernel(GENERATION_ATTENTION):
            return self.model(tokens, kv_cache=cache, start_pos=0)[0][:, -1, :]

    def _step(self, decoder: GraphDecoder | None, cache, token: torch.Tensor, pos) -> torch.Tensor:
        """Logits after one more token: the CUDA graph when there is one, else an eager forward."""
        if decoder is not None and not self.graph_failed:
            try:
                return decoder.step(token, pos)
            except Exception as e:  # a model that cannot be captured still decodes, eagerly
                warnings.warn(f"CUDA-graph decoding failed, decoding eagerly from now on: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}")
                self.graph_failed = True
        with sdpa_kernel(GENERATION_ATTENTION):
            return self.model(token, kv_cache=cache, start_pos=pos)[0][:, -1, :]

    def crop_note(self, prompt: str) -> str | None:
        """The line telling a user that the prompt is longer than the context, so that its start
        plays no part; None when it fits."""
        n, block_size = len(encode_prompt(self.tokenizer, prompt)), self.model.config.block_size
        if n <= block_size:
            return None
        return (f"the prompt has {n} tokens, more than the model's context of {block_size}: "
                f"generating from its last {block_size}")

    def stream(self, prompt: str, cfg: SamplingConfig) -> TextStream:
        """The continuation of one prompt, as text pieces while they are sampled."""
        return self._stream(encode_prompt(self.tokenizer, prompt), cfg, ())

    def fit_chat(self, messages: list[dict], max_new_tokens: int) -> list[dict]:
        """The conversation without its oldest turns, as many as the prompt for the reply and
        max_new_tokens need to fit the context. A system message and the last message stay; a kept
        history starts at a user's message, never at a reply to one that was dropped."""
        if not isinstance(messages, list) or not messages:
            raise UserError("a conversation must be a non-empty list of {'role': ..., 'content': ...} messages")
        block = self.model.config.block_size
        system = [m for m in messages[:1] if isinstance(m, dict) and m.get("role") == "system"]
        turns = messages[len(system):]
        while len(turns) > 1 and len(chat.encode_prompt(self.tokenizer, system + turns)) + max_new_tokens > block:
            turns = turns[1:]
            while len(turns) > 1 and turns[0].get("role") == "assistant":
                turns = turns[1:]
        return system + turns

    def chat_stream(self, messages: list[dict], cfg: SamplingConfig) -> TextStream:
        """The assistant's reply to a conversation ([{"role": ..., "content": ...}, ...], the tokenizer's
        chat format), as text pieces while they are sampled, up to the end of its turn. The oldest
        turns are left out when the conversation and the reply would not fit the context (fit_chat)."""
        if not chat.has_chat_format(self.tokenizer):
            raise UserError("this checkpoint has no chat template: fine-tune it with finetune.py first, "
                            "or give it a text prompt to continue")
        ids = chat.encode_prompt(self.tokenizer, self.fit_chat(messages, cfg.max_new_tokens))
        return self._stream(ids, cfg, chat.reply_stop_ids(self.tokenizer))

    def _stream(self, ids: list[int], cfg: SamplingConfig, stop_ids: Collection[int]) -> TextStream:
        device = next(self.model.parameters()).device
        eos = self.tokenizer.eos_token_id
        tokens = self.generate_ids(torch.tensor([ids], device=device), cfg, eos, len(self.tokenizer), stop_ids)
        return TextStream(tokens, self.tokenizer, {eos, *stop_ids} if cfg.stop_at_eos else set())

    def continuation_ids(self, prompts: list[str], cfg: SamplingConfig) -> list[list[int]]:
        """The new tokens of several prompts (up to EOS). Prompts of equal token length share one batched decode."""
        device = next(self.model.parameters()).device
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_len.setdefault(len(ids), []).append(i)
        results: list[list[int]] = [[] for _ in prompts]
        eos = self.tokenizer.eos_token_id
        for idxs in by_len.values():
            batch = torch.tensor([encoded[i] for i in idxs], device=device)
            steps = list(self.generate_ids(batch, cfg, eos, len(self.tokenizer)))
            tokens = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in idxs]
            for row, i in zip(tokens, idxs):
                results[i] = row[:row.index(eos)] if cfg.stop_at_eos and eos in row else row
        return results

    def generate(self, prompts: list[str], cfg: SamplingConfig) -> list[str]:
        """The continuations of several prompts, as text."""
        return [self.tokenizer.decode(ids) for ids in self.continuation_ids(prompts, cfg)]


def generate_ids(model, prompt: torch.Tensor, cfg: SamplingConfig, eos_id: int | None = None,
                 vocab_limit: int | None = None) -> Iterator[torch.Tensor]:
    """Engine.generate_ids for a bare model, keeping no decoder for later calls."""
    return Engine(model).generate_ids(prompt, cfg, eos_id, vocab_limit)


def stream_text(model, tokenizer, prompt: str, cfg: SamplingConfig) -> TextStream:
    """Engine.stream for a bare model and its tokenizer, keeping no decoder for later calls."""
    return Engine(model, tokenizer).stream(prompt, cfg)


def generate_batch(model, tokenizer, prompts: list[str], cfg: SamplingConfig) -> list[str]:
    """Engine.generate for a bare model and its tokenizer, keeping no decoder for later calls."""
    return Engine(model, tokenizer).generate(prompts, cfg)
