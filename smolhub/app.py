"""The web demo every model folder serves, and a side-by-side comparison of several checkpoints.

    cd StoryLlama && python gradio/app.py --checkpoint out/StoryLlama
    python -m smolhub.app compare --checkpoints out/StoryLlama ../StoryMixtral/out/StoryMixtral

The demo streams prompt + continuation into its output box as tokens arrive, and exposes the same
generation as the API endpoint `/generate` (prompt first, every other argument defaulted):

    from gradio_client import Client
    print(Client("http://127.0.0.1:7860").predict("Once upon a time", api_name="/generate"))

For a given seed the text equals `smolhub.inference.generate_text` with the same settings.

A checkpoint fine-tuned to chat (its tokenizer has the chat template) gets a chat instead: each reply
streams into the conversation and ends at the end of its turn, and the endpoint `/chat` takes a
message and the sampling settings, each client's calls continuing one conversation
(`generate_text(messages=...)` with the same settings gives the same replies).
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import gradio as gr

from smolhub.chat import has_chat_format
from smolhub.cli import Command, parse_cli, parse_command, run_main
from smolhub.config import option
from smolhub.errors import UserError
from smolhub.generate import Engine, SamplingConfig, TextStream, check_unicode
from smolhub.inference import check_architecture, load_model
from smolhub.quantize import QUANTIZE_CHOICES, QUANTIZE_HELP

EXAMPLES = ("Once upon a time", "One day, a little girl named Lily found",
            "The dragon looked at the knight and said")

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


def _real(name: str, value) -> float:
    # API callers send raw JSON, so a number may arrive as a string, as null or as NaN
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return number


def _integer(name: str, value) -> int:
    number = _real(name, value)
    if number != int(number):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def check_request(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                  limits: Limits) -> tuple[str, SamplingConfig]:
    """Validate one request; a negative seed draws a fresh one so the result can still be reproduced."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty: type some text for the model to continue")
    if len(prompt) > limits.max_prompt_chars:
        raise UserError(f"the prompt has {len(prompt)} characters, over this demo's limit of "
                        f"{limits.max_prompt_chars}: shorten it")
    check_unicode(prompt)
    max_new_tokens = _integer("max new tokens", max_new_tokens)
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise UserError(f"max new tokens must be between 1 and {limits.max_new_tokens}, got {max_new_tokens}")
    seed = _integer("seed", seed)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=_real("temperature", temperature),
                         top_k=_integer("top-k", top_k), top_p=_real("top-p", top_p),
                         repetition_penalty=_real("repetition penalty", repetition_penalty),
                         seed=seed if seed >= 0 else random.randrange(2**31))
    return prompt, cfg


def crop_suffix(engine: Engine, prompt: str) -> str:
    """What a status line adds when the prompt is longer than the model's context."""
    note = engine.crop_note(prompt)
    return f" ({note})" if note else ""


class Timed:
    """A text stream that adds up the time spent producing its pieces, so the speed shown is the
    model's, not including the time the app spends sending each piece to the browser."""

    def __init__(self, pieces: TextStream):
        self.pieces, self.seconds = pieces, 0.0

    def speed(self) -> str:
        n = self.pieces.n_tokens
        return f"{n} tokens in {self.seconds:.2f} s, {n / max(self.seconds, 1e-9):.1f} tokens/s"

    def __iter__(self):
        return self

    def __next__(self) -> str:
        start = time.perf_counter()
        try:
            return next(self.pieces)
        finally:
            self.seconds += time.perf_counter() - start


class StopButtons:
    """The browser sessions whose Stop button was pressed. Their generation ends itself at its next piece,
    with "Stopped." as its last update: cancelling the event from the button instead races, since pieces
    already on their way to the page can land after the button's own status."""

    def __init__(self):
        self.sessions: set[str] = set()

    def press(self, request: gr.Request) -> None:
        self.sessions.add(request.session_hash)

    def reset(self, request: gr.Request | None) -> None:
        if request is not None:
            self.sessions.discard(request.session_hash)

    def pressed(self, request: gr.Request | None) -> bool:
        return request is not None and request.session_hash in self.sessions


def streamed(pieces: Timed, text: str, note: str, seed: int) -> Iterator[tuple[str, object]]:
    """(text so far, status line) as the pieces arrive, then the speed and seed: what both demos show."""
    status = "Generating..." + note
    for piece in pieces:
        text += piece
        # the status goes out once, not again with every piece
        yield text, status
        status = gr.skip()
    yield text, f"{pieces.speed()}, seed {seed}{note}"


def model_card(engine: Engine) -> str:
    meta, model = engine.meta, engine.model

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
        f"**Checkpoint** `{engine.path}`",
    ])


def _sampling_inputs(max_new_tokens: int) -> list[gr.components.Component]:
    """The sampling controls, not yet placed: the completion demos lay them out in rows, the chat
    hands them to gr.ChatInterface."""
    return [
        gr.Slider(1, max_new_tokens, value=min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens), step=1,
                  label="Max new tokens", render=False),
        gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature", info="0 = greedy",
                  render=False),
        gr.Slider(0, 200, value=DEFAULT_TOP_K, step=1, label="Top-k", info="0 = off", render=False),
        gr.Slider(0.05, 1.0, value=DEFAULT_TOP_P, step=0.05, label="Top-p", info="1 = off", render=False),
        gr.Slider(0.5, 2.0, value=DEFAULT_REPETITION_PENALTY, step=0.05, label="Repetition penalty", info="1 = off",
                  render=False),
        gr.Number(value=-1, precision=0, label="Seed", info="-1 = random", elem_id="seed", render=False),
    ]


def _sampling_controls(max_new_tokens: int) -> list[gr.components.Component]:
    controls = _sampling_inputs(max_new_tokens)
    with gr.Accordion("Sampling", open=True):
        for row in (controls[:3], controls[3:]):
            with gr.Row():
                for control in row:
                    control.render()
    return controls


def build_app(engine: Engine, title: str, max_prompt_chars: int = 2000, max_new_tokens_limit: int = 512,
              examples: Sequence[str] = EXAMPLES) -> gr.Blocks:
    """The demo of one loaded model (from `load_model`): streamed generation, a model card, `/generate`.
    A prompt longer than the model's context keeps its end, which the status line says."""
    limits = Limits(max_prompt_chars, max_new_tokens_limit)
    stops = StopButtons()

    def stream(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
               request: gr.Request = None):
        stops.reset(request)
        try:
            prompt, cfg = check_request(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                        seed, limits)
            for update in streamed(Timed(engine.stream(prompt, cfg)), prompt, crop_suffix(engine, prompt), cfg.seed):
                if stops.pressed(request):
                    yield gr.skip(), "Stopped."
                    return
                yield update
        except UserError as e:
            # a user mistake: show it in the page, keep the server log for real failures
            raise gr.Error(str(e), print_exception=False) from None

    def generate(prompt: str, max_new_tokens: int = min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens),
                 temperature: float = DEFAULT_TEMPERATURE, top_k: int = DEFAULT_TOP_K,
                 top_p: float = DEFAULT_TOP_P, repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
                 seed: int = -1) -> Iterator[str]:
        """The prompt followed by its continuation, streamed; the last value is the whole text."""
        for text, _ in stream(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed):
            yield text

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Once upon a time", elem_id="prompt")
                controls = _sampling_controls(limits.max_new_tokens)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                output = gr.Textbox(label="Output", lines=12, interactive=False, elem_id="output")
                stats = gr.Markdown(elem_id="stats")
                gr.Examples([[e] for e in examples], inputs=[prompt])
            with gr.Column(scale=1):
                gr.Markdown("### Model card")
                gr.Markdown(model_card(engine), elem_id="model-card")
        # the browser's button streams text and speed; API clients get the text alone, from `generate`.
        # Both draw on one concurrency budget, so --concurrency bounds the generations running at once.
        run.click(stream, [prompt, *controls], [output, stats], api_visibility="private", concurrency_id="generate")
        stop.click(stops.press, None, None, queue=False, api_visibility="private")
        gr.api(generate, api_name="generate", concurrency_id="generate")
    return demo


def _text(content) -> str:
    """A chatbot message's content as text: gradio hands its history over as lists of parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def build_chat_app(engine: Engine, title: str, max_prompt_chars: int = 2000,
                   max_new_tokens_limit: int = 512) -> gr.Blocks:
    """The demo of a checkpoint fine-tuned to chat (from `load_model`): each reply streams into the
    conversation and ends at the end of its turn; a model card; `/chat` for API clients. The
    oldest turns are left out when the conversation and the reply would not fit the context, which
    the status line says."""
    limits = Limits(max_prompt_chars, max_new_tokens_limit)

    def respond(message, history, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed):
        try:
            message, cfg = check_request(message, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                         seed, limits)
            conversation = [{"role": m["role"], "content": _text(m["content"])} for m in history]
            conversation = engine.fit_chat(conversation + [{"role": "user", "content": message}],
                                           cfg.max_new_tokens)
            dropped = len(history) + 1 - len(conversation)
            note = f" (left out the oldest {dropped} messages to fit the context)" if dropped else ""
            yield from streamed(Timed(engine.chat_stream(conversation, cfg)), "", note, cfg.seed)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}")
        with gr.Row():
            with gr.Column(scale=3):
                stats = gr.Markdown(elem_id="stats", render=False)
                gr.ChatInterface(respond, chatbot=gr.Chatbot(elem_id="chatbot", height=460, label="Chat"),
                                 textbox=gr.Textbox(placeholder="Type a message and press Enter",
                                                    elem_id="message", show_label=False),
                                 additional_inputs=_sampling_inputs(limits.max_new_tokens),
                                 additional_inputs_accordion="Sampling", additional_outputs=[stats],
                                 api_name="chat", fill_height=False, autofocus=False)
                stats.render()
            with gr.Column(scale=1):
                gr.Markdown("### Model card")
                gr.Markdown(model_card(engine), elem_id="model-card")
    return demo


def build_compare_app(engines: Sequence[Engine], max_prompt_chars: int = 2000, max_new_tokens_limit: int = 512,
                      examples: Sequence[str] = EXAMPLES) -> gr.Blocks:
    """One prompt, several loaded models side by side, each with its own speed."""
    limits = Limits(max_prompt_chars, max_new_tokens_limit)
    n = len(engines)
    stops = StopButtons()

    def compare(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                request: gr.Request = None):
        stops.reset(request)
        try:
            prompt, cfg = check_request(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                        seed, limits)
            notes = [crop_suffix(e, prompt) for e in engines]
            streams = [Timed(e.stream(prompt, cfg)) for e in engines]
            texts, sent, running = [prompt] * n, [None] * n, set(range(n))
            stats = ["Generating..." + note for note in notes]
            # one piece from each model in turn, so all outputs grow together
            while running:
                if stops.pressed(request):
                    yield *[gr.skip()] * n, *["Stopped."] * n
                    return
                for i in sorted(running):
                    piece = next(streams[i], None)
                    if piece is None:
                        running.discard(i)
                        stats[i] = f"{streams[i].speed()}, seed {cfg.seed}{notes[i]}"
                    else:
                        texts[i] += piece
                # a status goes out only when it changes, as in build_app
                yield *texts, *[gr.skip() if s == old else s for s, old in zip(stats, sent)]
                sent = list(stats)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None

    with gr.Blocks(title="SmolHub comparison") as demo:
        gr.Markdown("# SmolHub comparison")
        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Once upon a time", elem_id="prompt")
        controls = _sampling_controls(limits.max_new_tokens)
        with gr.Row():
            run = gr.Button("Generate", variant="primary", elem_id="generate")
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
        gr.Examples([[e] for e in examples], inputs=[prompt])
        outputs, stats = [], []
        with gr.Row():
            for i, engine in enumerate(engines):
                with gr.Column():
                    gr.Markdown(f"### {engine.model.architecture}\n`{engine.path}`")
                    outputs.append(gr.Textbox(label="Output", lines=12, interactive=False, elem_id=f"output-{i}"))
                    stats.append(gr.Markdown(elem_id=f"stats-{i}"))
                    with gr.Accordion("Model card", open=False):
                        gr.Markdown(model_card(engine))
        run.click(compare, [prompt, *controls], outputs + stats, api_name="compare")
        stop.click(stops.press, None, None, queue=False, api_visibility="private")
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
    max_new_tokens_limit: int = option(512, "Most tokens one request may generate.")
    max_prompt_chars: int = option(2000, "Longest prompt accepted, in characters.")
    concurrency: int = option(1, "Requests generated at once; the rest wait in the queue.")
    compile: bool = option(False, "CUDA: compile the decode step (~2x tokens/s; the first request of each batch "
                           "size waits ~20 s for the compiler).")
    quantize: Literal[QUANTIZE_CHOICES] = option("none", QUANTIZE_HELP)

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
                           description=f"Serve a {architecture} checkpoint as a web demo with a /generate API "
                           "(a chat with a /chat API for a checkpoint fine-tuned to chat).")
    if not ckpt.checkpoint:
        raise UserError("--checkpoint is required (a checkpoint folder, a run's out_dir or a Hub repo id)")
    engine = load_model(ckpt.checkpoint, args.device, compile=args.compile, quantize=args.quantize)
    check_architecture(engine, architecture, ckpt.checkpoint, "gradio/app.py")
    print(f"{architecture} from {engine.path} on {next(engine.model.parameters()).device}", file=sys.stderr)
    build = build_chat_app if has_chat_format(engine.tokenizer) else build_app
    serve(build(engine, architecture, args.max_prompt_chars, args.max_new_tokens_limit), args)


@dataclass
class CompareArgs:
    checkpoints: list[str] = option([], "Two or more checkpoint folders, out_dirs or Hub repo ids, side by side.")


COMMANDS = {"compare": Command((CompareArgs, ServeArgs), help="Serve two or more checkpoints side by side.")}


def cli(argv: list[str] | None = None) -> None:
    """Entry point of `python -m smolhub.app compare --checkpoints A B ...`."""
    _, (compare, args) = parse_command(COMMANDS, argv, prog="python -m smolhub.app",
                                       description="Compare checkpoints side by side in a web demo (one model "
                                       "is served by its folder's gradio/app.py).")
    if len(compare.checkpoints) < 2:
        raise UserError("--checkpoints needs at least two checkpoints to compare, e.g. "
                        "--checkpoints StoryLlama/out/StoryLlama StoryMixtral/out/StoryMixtral")
    engines = [load_model(c, args.device, compile=args.compile, quantize=args.quantize) for c in compare.checkpoints]
    serve(build_compare_app(engines, args.max_prompt_chars, args.max_new_tokens_limit), args)


if __name__ == "__main__":
    run_main(cli)
