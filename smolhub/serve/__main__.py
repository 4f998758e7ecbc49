"""Serve a checkpoint behind an OpenAI-compatible API (any OpenAI client library can talk to it):

    python -m smolhub.serve --checkpoint out/StoryLlama-dpo
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "StoryLlama-dpo", "prompt": "Once upon a time", "max_tokens": 50}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (a checkpoint
fine-tuned to chat; its chat template), streamed as server-sent events with "stream": true.
Requests in flight are decoded together, a new one joining the batch at the next step.
A prompt whose tokens plus max_tokens exceed the model's context is refused with a 400 error of code
"context_length_exceeded", as OpenAI does; nothing is cut. See smolhub/serve/api.py for every parameter.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from smolhub.cli import parse_cli, run_main
from smolhub.config import option
from smolhub.errors import UserError
from smolhub.quantize import QUANTIZE_CHOICES, QUANTIZE_HELP

DESCRIPTION = ("Serve a checkpoint behind an OpenAI-compatible API: GET /health, GET /v1/models, POST /v1/completions, "
               "POST /v1/chat/completions (a checkpoint fine-tuned to chat), streamed with \"stream\": true. Requests "
               "in flight are decoded together. A prompt whose tokens plus max_tokens exceed the model's context is "
               "refused (400, code \"context_length_exceeded\"), as OpenAI does; nothing is cut.")


@dataclass
class ServeArgs:
    checkpoint: str = option("", "Checkpoint folder, a run's out_dir (newest checkpoint) or a Hub repo id.")
    host: str = option("127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    port: int = option(8000, "Port to listen on.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option("auto", "Weights dtype; auto = bf16 on CUDA.")
    quantize: Literal[QUANTIZE_CHOICES] = option("none", QUANTIZE_HELP)
    compile: bool = option(False, "CUDA: compile the decode step before capturing it (faster steps after ~20 s "
                           "of compiling per batch-size bucket, paid by the first requests).")
    max_batch: int = option(64, "Most requests decoded together; more wait for a free row.")
    model_name: str = option("", "The model's name in the API (the `model` of requests); default: the "
                             "checkpoint folder's name.")


def check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host") from None


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_cli((ServeArgs,), {}, argv, prog="python -m smolhub.serve", description=DESCRIPTION)
    if not args.checkpoint:
        raise UserError("--checkpoint is required (a checkpoint folder, a run's out_dir or a Hub repo id)")
    if args.max_batch < 1:
        raise UserError(f"--max_batch must be at least 1, got {args.max_batch}")
    check_port(args.host, args.port)
    import uvicorn

    from smolhub.inference import load_model
    from smolhub.serve.api import create_app

    engine = load_model(args.checkpoint, args.device, args.dtype, args.compile, quantize=args.quantize)
    name = args.model_name or Path(args.checkpoint.rstrip("/")).name
    print(f"serving {name} ({engine.model.architecture}, context {engine.model.config.block_size}) on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(engine, name, args.max_batch), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    run_main(main)
