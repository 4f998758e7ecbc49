"""Inference shared by every model folder: `load_model` / `generate_text` and the inference.py CLI,
which continues text prompts or, with --chat, talks to a checkpoint fine-tuned to chat."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

from smolhub.chat import has_chat_format
from smolhub.checkpoint import load_checkpoint
from smolhub.cli import parse_cli
from smolhub.config import option
from smolhub.errors import UserError
from smolhub.generate import Engine, SamplingConfig
from smolhub.quantize import QUANTIZE_CHOICES, QUANTIZE_HELP, check_quantize, quantize_model


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu")
    return torch.device(device)


def load_model(path: str, device: str = "auto", dtype: str = "auto", compile: bool = False,
               quantize: str = "none") -> Engine:
    """Load a checkpoint folder, a run's out_dir (its newest checkpoint) or a Hub repo id for inference.
    Any of the five architectures loads, whichever model folder the call comes from.

    The Engine returned holds the model (`.model`), its tokenizer (`.tokenizer`), the checkpoint's
    training record (`.meta`) and folder (`.path`), so `generate_text(model=model, prompt=...)` needs
    nothing else. compile=True (CUDA) compiles the decode step before capturing it: about twice the
    tokens/s, after ~20 s of compiling in the first generation of each batch size. Worth it for a
    server, not for one generation. quantize ("int8", "int8-dynamic", "int4"; smolhub.quantize) stores
    the weights in fewer bits through torchao, after the model is on its device and in its dtype; a
    setting this device cannot run is refused before the checkpoint is read."""
    dev = pick_device(device)
    if compile and dev.type != "cuda":
        raise UserError("--compile speeds up CUDA-graph decoding, which needs a CUDA device; drop it on CPU")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    check_quantize(quantize, dev, getattr(torch, dtype))
    loaded = load_checkpoint(path, dev)
    loaded.model.to(getattr(torch, dtype))
    quantize_model(loaded.model, quantize)
    return Engine(loaded.model, loaded.tokenizer, compile, loaded.meta, loaded.path)


def check_architecture(engine: Engine, architecture: str, checkpoint: str, script: str) -> None:
    """A model folder's scripts (inference.py, gradio/app.py) serve that folder's architecture, whose
    README documents them; another architecture's checkpoint is sent to its own folder's script."""
    found = engine.model.architecture
    if found != architecture:
        raise UserError(f"{checkpoint} holds a {found} model, not {architecture}: run {found}/{script} instead")


def generate_text(model: Engine, prompt: str | None = None, max_length: int = 100, temperature: float = 0.8,
                  top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                  stream: bool = False, messages: list[dict] | None = None):
    """The prompt followed by up to max_length new tokens (a generator of text pieces if stream=True).
    A prompt longer than the model's context keeps its end, and a longer generation slides along.

    messages instead of a prompt, for a checkpoint fine-tuned to chat: a conversation
    [{"role": "system" | "user" | "assistant", "content": text}, ...] and the assistant's reply to it,
    up to max_length tokens or the end of its turn (streamed as pieces if stream=True); the oldest
    turns are left out when the conversation and the reply would not fit the context."""
    if not isinstance(model, Engine):
        raise UserError("generate_text takes the model that load_model(path) returns")
    if (prompt is None) == (messages is None):
        raise UserError("generate_text takes either prompt= (text to continue) or messages= (a conversation "
                        "to reply to)")
    cfg = SamplingConfig(max_new_tokens=max_length, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, seed=seed)
    if messages is not None:
        reply = model.chat_stream(messages, cfg)
        return reply if stream else "".join(reply)
    if stream:
        return model.stream(prompt, cfg)
    return prompt + model.generate([prompt], cfg)[0]


@dataclass
class InferenceArgs:
    checkpoint: str = option("", "Checkpoint folder, a run's out_dir (newest checkpoint) or a Hub repo id.")
    prompt: str = option("Once upon a time", "Text to continue.")
    prompts_file: str = option("", "A file with one prompt per line, generated as a batch (overrides --prompt).")
    max_new_tokens: int = option(200, "Tokens to generate per prompt.")
    temperature: float = option(0.8, "Sampling temperature; 0 = greedy.")
    top_k: int = option(0, "Sample among the k most likely tokens (0 = off).")
    top_p: float = option(1.0, "Nucleus sampling: the smallest set of tokens with this much probability.")
    repetition_penalty: float = option(1.0, "Divide the logits of tokens already present by this (1 = off).")
    seed: int = option(-1, "Sampling seed (-1 = random).")
    stream: bool = option(False, "Print tokens as they are generated (single prompt).")
    json: bool = option(False, "Print one JSON object per prompt: prompt, completion, tokens, tokens_per_s. With "
                        "--stream, one {\"delta\": text} line per piece as it is generated comes first.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option("auto", "Weights dtype; auto = bf16 on CUDA.")
    compile: bool = option(False, "CUDA: compile the decode step (~2x tokens/s after ~20 s of compiling; for long "
                           "or many generations).")
    quantize: Literal[QUANTIZE_CHOICES] = option("none", QUANTIZE_HELP)
    chat: bool = option(False, "Talk to a checkpoint fine-tuned to chat: each line of stdin is a user turn (until "
                        "EOF), each reply streams, ending at the end of its turn; the oldest turns are left out "
                        "when the conversation would not fit the context with --max_new_tokens.")
    system: str = option("", "With --chat: a system message that starts the conversation.")


# what a --chat session takes from stdin instead, and what it always does
NOT_WITH_CHAT = ("prompt", "prompts_file", "stream", "json")


def chat_session(engine: Engine, cfg: SamplingConfig, system: str) -> None:
    """The --chat loop: a user turn per line of stdin, the reply streamed to stdout. A terminal gets a
    prompt marker; a pipe gets the replies alone, one after the other."""
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and recall in input())
        print("Type a message and press Enter; Ctrl-D ends the chat.", file=sys.stderr)
    history = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        kept = engine.fit_chat(history, cfg.max_new_tokens)
        if len(kept) < len(history):
            print(f"(left out the oldest {len(history) - len(kept)} messages: the conversation and "
                  f"{cfg.max_new_tokens} new tokens must fit the context of {engine.model.config.block_size})",
                  file=sys.stderr)
        history = kept
        reply = ""
        for piece in engine.chat_stream(history, cfg):
            print(piece, end="", flush=True)
            reply += piece
        print(flush=True)
        history.append({"role": "assistant", "content": reply})
    if interactive:
        print()  # the shell's prompt starts on a line of its own after Ctrl-D


def main(architecture: str, argv: list[str] | None = None, prog: str = "inference.py") -> None:
    """Entry point of <architecture>/inference.py."""
    parsed = parse_cli((InferenceArgs,), {}, argv, prog=prog,
                       description=f"Generate text from a {architecture} checkpoint, or chat with it (--chat).")
    (args,) = parsed
    if not args.checkpoint:
        raise UserError("--checkpoint is required (a checkpoint folder, a run's out_dir or a Hub repo id)")
    if args.chat:
        clash = [f"--{name}" for name in NOT_WITH_CHAT if name in parsed.explicit]
        if clash:
            raise UserError(f"--chat reads each user turn from stdin and streams the reply: drop {', '.join(clash)}")
    elif args.system:
        raise UserError("--system starts a conversation: add --chat")
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompts_file {args.prompts_file}: {e}")
        if not prompts:
            raise UserError(f"--prompts_file {args.prompts_file} holds no prompts")
    else:
        prompts = [args.prompt]
    if args.stream and len(prompts) > 1:
        raise UserError("--stream works with a single prompt; drop --prompts_file or --stream")
    engine = load_model(args.checkpoint, args.device, args.dtype, args.compile, args.quantize)
    check_architecture(engine, architecture, args.checkpoint, "inference.py")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                         seed=None if args.seed < 0 else args.seed)
    if args.chat:
        if not has_chat_format(engine.tokenizer):
            raise UserError(f"{args.checkpoint} has no chat template: fine-tune it first, e.g. python finetune.py "
                            f"--init_from {args.checkpoint} --dataset yahma/alpaca-cleaned, then chat with that")
        chat_session(engine, cfg, args.system)
        return
    for i, prompt in enumerate(prompts):
        note = engine.crop_note(prompt)
        if note:
            print(note if len(prompts) == 1 else f"prompt {i + 1}: {note}", file=sys.stderr)
    start = time.perf_counter()
    if args.stream:
        if not args.json:
            print(prompts[0], end="", flush=True)
        stream = engine.stream(prompts[0], cfg)
        pieces = []
        for piece in stream:
            pieces.append(piece)
            if args.json:  # a JSON line per piece, as an OpenAI-style stream sends deltas; the record follows
                print(json.dumps({"delta": piece}), flush=True)
            else:
                print(piece, end="", flush=True)
        if not args.json:
            print()
        completions, counts = ["".join(pieces)], [stream.n_tokens]
    else:
        ids = engine.continuation_ids(prompts, cfg)
        completions, counts = [engine.tokenizer.decode(i) for i in ids], [len(i) for i in ids]
    elapsed = time.perf_counter() - start
    n_tokens = sum(counts)
    if args.json:
        for p, c, n in zip(prompts, completions, counts):
            print(json.dumps({"prompt": p, "completion": c, "tokens": n, "tokens_per_s": n_tokens / elapsed}))
    elif not args.stream:
        for p, c in zip(prompts, completions):
            print(p + c)
            if len(prompts) > 1:
                print("-" * 40)
    print(f"{n_tokens} tokens in {elapsed:.2f}s ({n_tokens / elapsed:.1f} tokens/s)", file=sys.stderr)
