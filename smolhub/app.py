"""The web demo every model folder serves, and a side-by-side comparison of several checkpoints.

    cd StoryLlama && python gradio/app.py --checkpoint out/StoryLlama
    python -m smolhub.app compare --checkpoints out/StoryLlama ../StoryMixtral/out/StoryMixtral

The demo streams prompt + continuation into its output box as tokens arrive, and exposes the same
generation as the API endpoint `/generate` (prompt first, every other argument defaulted):

    from gradio_client import Client
    print(Client("http://127.0.0.1:7860").predict("Once upon a time", api_name="/generate"))

For a given seed the text equals `smolhub.inference.generate_text` with the same settings.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import gradio as gr

from smolhub.cli import run_main
from smolhub.config import option, parse_cli
from smolhub.errors import UserError
from smolhub.generate import SamplingConfig, stream_text
from smolhub.inference import load_model

EXAMPLES = ("Once upon a time", "One day, a little girl named Lily found", "The dragon looked at the knight and said")

# defaults of the sampling controls and of the API's optional arguments
DEFAULT_MAX_NEW_TOKENS = 200
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 0
DEFAULT_TOP_P = 1.0
DEFAULT_REPETITION_PENALTY = 1.0


@dataclass
class Limits:
    max_prompt_chars: int
    max_new_tokens: int


def token_limit(models: Sequence, requested: int) -> int:
    """Prompt and continuation share the context, so at most block_size - 1 tokens can be new."""
    return max(1, min([requested] + [m.config.block_size - 1 for m in models]))


def _integer(name: str, value) -> int:
    # API callers send raw JSON, so a number may arrive as 100.0 or as a string
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if number != int(number):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _real(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None


def check_request(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                  limits: Limits) -> tuple[str, SamplingConfig]:
    """Validate one request; a negative seed draws a fresh one so the result can still be reproduced."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty: type some text for the model to continue")
    if len(prompt) > limits.max_prompt_chars:
        raise UserError(f"the prompt has {len(prompt)} characters, over this demo's limit of "
                        f"{limits.max_prompt_chars}: shorten it")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the prompt is not valid Unicode text (it holds a lone surrogate): "
                        "retype it or paste it from another source") from None
    max_new_tokens = _integer("max new tokens", max_new_tokens)
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise UserError(f"max new tokens must be between 1 and {limits.max_new_tokens}, got {max_new_tokens}")
    seed = _integer("seed", seed)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=_real("temperature", temperature),
                         top_k=_integer("top-k", top_k), top_p=_real("top-p", top_p),
                         repetition_penalty=_real("repetition penalty", repetition_penalty),
                         seed=seed if seed >= 0 else random.randrange(2**31))
    return prompt, cfg


def speed(model, continuation: str, seconds: float) -> str:
    # Counted by re-encoding the text: the few tokens that decode to a partial character count as
    # whatever the text re-encodes to, which is close to, not exactly, the number sampled.
    n = len(model.tokenizer.encode(continuation, add_special_tokens=False))
    return f"{n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tokens/s"


def model_card(model) -> str:
    meta = model.checkpoint.get("meta", {})

    def show(key: str, fmt: str = "{}") -> str:
        value = meta.get(key)
        return "unknown" if value is None else fmt.format(value)

    total, active = model.num_params(), model.num_active_params()
    params = f"{total / 1e6:.2f}M" + (f" ({active / 1e6:.2f}M active per token)" if active != total else "")
    device = next(model.parameters()).device
    return "\n".join([
        f"**Architecture** {model.architecture}  ",
        f"**Parameters** {params}  ",
        f"**Training steps** {show('step', '{:,}')}  ",
        f"**Tokens seen** {show('tokens_seen', '{:,}')}  ",
        f"**Validation loss** {show('val_loss', '{:.4f}')}  ",
        f"**Dataset** {show('dataset')}  ",
        f"**Context** {model.config.block_size} tokens, running on {device}  ",
        f"**Checkpoint** `{model.checkpoint_path}`",
    ])


def _sampling_controls(max_new_tokens: int) -> list[gr.components.Component]:
    with gr.Accordion("Sampling", open=True):
        with gr.Row():
            tokens = gr.Slider(1, max_new_tokens, value=min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens), step=1,
                               label="Max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature",
                                    info="0 = greedy")
            top_k = gr.Slider(0, 200, value=DEFAULT_TOP_K, step=1, label="Top-k", info="0 = off")
        with gr.Row():
            top_p = gr.Slider(0.05, 1.0, value=DEFAULT_TOP_P, step=0.05, label="Top-p", info="1 = off")
            penalty = gr.Slider(0.5, 2.0, value=DEFAULT_REPETITION_PENALTY, step=0.05,
                                label="Repetition penalty", info="1 = off")
            seed = gr.Number(value=-1, precision=0, label="Seed", info="-1 = random")
    return [tokens, temperature, top_k, top_p, penalty, seed]


def build_app(model, title: str, max_prompt_chars: int = 2000, max_new_tokens_limit: int = 512,
              examples: Sequence[str] = EXAMPLES) -> gr.Blocks:
    """The demo of one loaded model (from `load_model`): streamed generation, a model card, `/generate`."""
    limits = Limits(max_prompt_chars, token_limit([model], max_new_tokens_limit))

    def stream(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed):
        try:
            prompt, cfg = check_request(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                        seed, limits)
            start, text = time.perf_counter(), prompt
            for piece in stream_text(model, model.tokenizer, prompt, cfg):
                text += piece
                yield text, "generating..."
        except UserError as e:
            raise gr.Error(str(e)) from None
        yield text, f"{speed(model, text[len(prompt):], time.perf_counter() - start)}, seed {cfg.seed}"

    def generate(prompt: str, max_new_tokens: int = min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens),
                 temperature: float = DEFAULT_TEMPERATURE, top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P,
                 repetition_penalty: float = DEFAULT_REPETITION_PENALTY, seed: int = -1) -> Iterator[str]:
        """The prompt followed by its continuation, streamed; the last value is the whole text."""
        for text, _ in stream(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed):
            yield text

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Once upon a time")
                controls = _sampling_controls(limits.max_new_tokens)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
                output = gr.Textbox(label="Output", lines=12, interactive=False)
                stats = gr.Markdown()
                gr.Examples([[e] for e in examples], inputs=[prompt])
            with gr.Column(scale=1):
                gr.Markdown("### Model card")
                gr.Markdown(model_card(model))
        # the browser's button streams text and speed; API clients get the text alone, from `generate`
        event = run.click(stream, [prompt, *controls], [output, stats], api_visibility="private")
        stop.click(None, cancels=[event])
        gr.api(generate, api_name="generate")
    return demo


def build_compare_app(models: Sequence, max_prompt_chars: int = 2000, max_new_tokens_limit: int = 512,
                      examples: Sequence[str] = EXAMPLES) -> gr.Blocks:
    """One prompt, several loaded models side by side, each with its own speed."""
    limits = Limits(max_prompt_chars, token_limit(models, max_new_tokens_limit))
    n = len(models)

    def compare(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed):
        try:
            prompt, cfg = check_request(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                        seed, limits)
            streams = [stream_text(m, m.tokenizer, prompt, cfg) for m in models]
            texts, stats, seconds = [prompt] * n, ["generating..."] * n, [0.0] * n
            # one piece from each model in turn, so all outputs grow together; each model's speed
            # counts only the time spent in its own steps
            while any(s is not None for s in streams):
                for i, s in enumerate(streams):
                    if s is None:
                        continue
                    start = time.perf_counter()
                    piece = next(s, None)
                    seconds[i] += time.perf_counter() - start
                    if piece is None:
                        streams[i] = None
                        stats[i] = speed(models[i], texts[i][len(prompt):], seconds[i])
                    else:
                        texts[i] += piece
                yield *texts, *stats
        except UserError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="SmolHub comparison") as demo:
        gr.Markdown("# SmolHub comparison")
        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Once upon a time")
        controls = _sampling_controls(limits.max_new_tokens)
        with gr.Row():
            run = gr.Button("Generate", variant="primary")
            stop = gr.Button("Stop", variant="stop")
        gr.Examples([[e] for e in examples], inputs=[prompt])
        outputs, stats = [], []
        with gr.Row():
            for model in models:
                with gr.Column():
                    gr.Markdown(f"### {model.architecture}\n`{model.checkpoint_path}`")
                    outputs.append(gr.Textbox(label="Output", lines=12, interactive=False))
                    stats.append(gr.Markdown())
                    with gr.Accordion("Model card", open=False):
                        gr.Markdown(model_card(model))
        event = run.click(compare, [prompt, *controls], outputs + stats, api_name="compare")
        stop.click(None, cancels=[event])
    return demo


@dataclass
class CheckpointArgs:
    checkpoint: str = option("", "Checkpoint folder, a run's out_dir (its newest checkpoint) or a Hub repo id.")


@dataclass
class ServeArgs:
    host: str = option("127.0.0.1", "Address to listen on; 0.0.0.0 serves other machines too.")
    port: int = option(7860, "Port to listen on.")
    share: bool = option(False, "Also publish a temporary public gradio.live link.")
    device: str = option("auto", "auto (CUDA when present, else CPU) | cpu | cuda | cuda:N.")
    max_new_tokens_limit: int = option(512, "Most tokens one request may generate (capped by the context).")
    max_prompt_chars: int = option(2000, "Longest prompt accepted, in characters.")
    concurrency: int = option(4, "Requests generated at once; the rest wait in the queue.")

    def __post_init__(self) -> None:
        for name in ["max_new_tokens_limit", "max_prompt_chars", "concurrency"]:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")


def serve(demo: gr.Blocks, args: ServeArgs) -> None:
    demo.queue(default_concurrency_limit=args.concurrency)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)
    except OSError as e:  # gradio's "Cannot find empty port"
        raise UserError(f"cannot listen on {args.host}:{args.port} ({str(e).splitlines()[0]}): "
                        "pass another --port") from None


def main(architecture: str, argv: list[str] | None = None) -> None:
    """Entry point of <architecture>/gradio/app.py: load the checkpoint once, then serve it."""
    ckpt, args = parse_cli((CheckpointArgs, ServeArgs), {}, argv, prog="gradio/app.py",
                           description=f"Serve a {architecture} checkpoint as a web demo with a /generate API.")
    if not ckpt.checkpoint:
        raise UserError("--checkpoint is required (a checkpoint folder, a run's out_dir or a Hub repo id)")
    model = load_model(ckpt.checkpoint, args.device)
    if model.architecture != architecture:
        raise UserError(f"{ckpt.checkpoint} holds a {model.architecture} model, not {architecture}: "
                        f"run {model.architecture}/gradio/app.py instead")
    print(f"{architecture} from {model.checkpoint_path} on {next(model.parameters()).device}", file=sys.stderr)
    serve(build_app(model, architecture, args.max_prompt_chars, args.max_new_tokens_limit), args)


def compare_main(argv: list[str] | None = None) -> None:
    # --checkpoints takes several values, which parse_cli's type checks do not handle; it is split
    # off here and the serving flags go through parse_cli like every other script's
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--checkpoints", nargs="+", default=[])
    known, rest = pre.parse_known_args(argv)
    (args,) = parse_cli((ServeArgs,), {}, rest, prog="python -m smolhub.app compare",
                        description="Compare checkpoints side by side. --checkpoints A B [...] (required): "
                                    "checkpoint folders, out_dirs or Hub repo ids.")
    if len(known.checkpoints) < 2:
        raise UserError("--checkpoints needs at least two checkpoints to compare, e.g. "
                        "--checkpoints StoryLlama/out/StoryLlama StoryMixtral/out/StoryMixtral")
    models = [load_model(c, args.device) for c in known.checkpoints]
    serve(build_compare_app(models, args.max_prompt_chars, args.max_new_tokens_limit), args)


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "compare":
        raise UserError("usage: python -m smolhub.app compare --checkpoints A B [...]; "
                        "one model is served by its folder's gradio/app.py")
    compare_main(argv[1:])


if __name__ == "__main__":
    run_main(cli)
