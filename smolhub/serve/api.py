"""The OpenAI-compatible HTTP API over a Scheduler: /health, /v1/models, /v1/completions and
/v1/chat/completions, streamed as server-sent events (`data: {...}` chunks, then `data: [DONE]`) or not.

Parameters: model, prompt (a string or a list of strings) or messages, max_tokens (chat: also
max_completion_tokens; default 16 for completions, as OpenAI's, and the rest of the context for chat),
temperature (0 = greedy), top_p, top_k (an extension, as vLLM's), n, seed, stop (a string or a list of
up to 4), stream, stream_options.include_usage, user. Any other parameter is refused unless it has its
neutral value (frequency_penalty 0, logprobs null, ...).

Stop strings cut the text where they begin, across token boundaries too, and are never sent; the
checkpoint's EOS (and in chat the end of the turn) ends a choice with finish_reason "stop", max_tokens
with "length". usage counts the prompt's tokens once per prompt and every token sampled, including the
one that ended a choice.

Context: a prompt whose tokens plus max_tokens exceed the model's context is refused (400,
code "context_length_exceeded"), as OpenAI does; nothing is cut.

Errors are OpenAI's error objects, {"error": {"message", "type", "param", "code"}}: 400 for a
malformed body or a bad parameter (named in `param`), 404 for an unknown model or path, 500 if
decoding fails.
"""
from __future__ import annotations

import asyncio
import json
import math
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from smolhub import chat
from smolhub.errors import UserError
from smolhub.generate import Engine, SamplingConfig, encode_prompt
from smolhub.serve.batching import Request, Scheduler, request_key

# parameters OpenAI defines that this server does not implement: accepted only at their neutral value
NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
           "echo": (False,), "best_of": (1,), "logit_bias": ({},), "suffix": ("",), "tools": ([],),
           "parallel_tool_calls": (True, False), "store": (False,), "metadata": ({},)}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
          "stream_options", "user"}
MAX_STOPS = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _value(body: dict, name: str, kind, default, what: str):
    """body[name] (null or absent: default), refused unless an instance of `kind`."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise APIError(400, f"{name} must be {what}, got {value!r}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"{name} must be a finite number, got {value}", name)
    return value


class Sampling:
    """The generation parameters of a request body, checked."""

    def __init__(self, body: dict, allowed: set[str], default_max_tokens: int | None):
        for name, value in body.items():
            if name in allowed or (name in NEUTRAL and (value is None or value in NEUTRAL[name])):
                continue
            raise APIError(400, f"{name} is not supported by this server", name)
        self.max_tokens = _value(body, "max_tokens", int, default_max_tokens, "an integer")
        if "max_completion_tokens" in allowed:
            self.max_tokens = _value(body, "max_completion_tokens", int, self.max_tokens, "an integer")
        if self.max_tokens is not None and self.max_tokens < 1:
            name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            raise APIError(400, f"{name} must be at least 1, got {self.max_tokens}", name)
        self.temperature = float(_value(body, "temperature", (int, float), 1.0, "a number"))
        self.top_p = float(_value(body, "top_p", (int, float), 1.0, "a number"))
        self.top_k = _value(body, "top_k", int, 0, "an integer")
        for name, field in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            try:  # the command line's rules for each setting
                SamplingConfig(**{field: getattr(self, name)})
            except UserError as e:
                raise APIError(400, str(e), name) from None
        self.n = _value(body, "n", int, 1, "an integer")
        if not 1 <= self.n <= 128:
            raise APIError(400, f"n must be between 1 and 128, got {self.n}", "n")
        self.seed = _value(body, "seed", int, None, "an integer")
        stop = _value(body, "stop", (str, list), [], "a string or a list of strings")
        self.stop = [stop] if isinstance(stop, str) else stop
        if len(self.stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in self.stop):
            raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
        self.stream = _value(body, "stream", bool, False, "true or false")
        options = _value(body, "stream_options", dict, {}, "an object")
        if options and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        self.include_usage = _value(options, "include_usage", bool, False, "true or false")
        _value(body, "user", str, "", "a string")

    def requests(self, ids: list[int], stop_ids: set[int], sink: asyncio.Queue, first_index: int) -> list[Request]:
        """The n Requests of one prompt; with a seed, choice i draws from the stream of (seed, i)."""
        return [Request(ids, self.max_tokens, self.temperature, self.top_p, self.top_k,
                        request_key(self.seed if self.seed is not None else secrets.randbits(64), first_index + i),
                        frozenset(stop_ids), sink)
                for i in range(self.n)]


class Choice:
    """One choice's text, decoded token by token: each token decodes with the few before it (not the
    whole text again), a UTF-8 character split across tokens waits for its last byte, and text that
    may begin a stop string is held back until it cannot."""

    def __init__(self, index: int, request: Request, tokenizer, stops: list[str]):
        self.index, self.request, self.tokenizer, self.stops = index, request, tokenizer, stops
        self.ids: list[int] = []
        self.start = self.read = 0  # ids[start:] begins at a character; ids[start:read] were sent
        self.pending = ""
        self.n_tokens = 0
        self.finish: str | None = None

    def add(self, token: int, finish: str | None) -> str:
        """The text that token releases (and, when finish is set, all that was held back)."""
        self.n_tokens += 1
        if token not in self.request.stop_ids:
            self.ids.append(token)
        sent = self.tokenizer.decode(self.ids[self.start:self.read])
        text = self.tokenizer.decode(self.ids[self.start:])
        new = ""
        if len(text) > len(sent) and (finish or not text.endswith("\ufffd")):
            new = text[len(sent):]
            self.start, self.read = self.read, len(self.ids)
        return self._release(new, finish)

    def _release(self, new: str, finish: str | None) -> str:
        self.pending += new
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            self.finish = "stop"
            self.request.cancelled = True  # the scheduler frees the row at its next step
            return out
        if finish:
            out, self.pending = self.pending, ""
            self.finish = finish
            return out
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(self.pending) + 1))
                    if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out


async def _updates(sink: asyncio.Queue, choices: dict[Request, Choice]) -> dict[Choice, str]:
    """Wait for the next tokens, then take every one already there: the text each choice gained.
    A client that reads slower than the model decodes gets several tokens per chunk."""
    events = [await sink.get()]
    while not sink.empty():
        events.append(sink.get_nowait())
    gained: dict[Choice, str] = {}
    for request, token, finish in events:
        choice = choices[request]
        if choice.finish:
            continue
        if finish == "error":
            raise APIError(500, request.error, type="server_error")
        gained[choice] = gained.get(choice, "") + choice.add(token, finish)
    return gained


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


_MARK = "\x00text\x00"  # where a text chunk's text goes: after every constant part that could hold it


def create_app(engine: Engine, model_name: str, max_batch: int = 64) -> FastAPI:
    """The app; its scheduler (app.state.scheduler) starts and stops with it."""
    tokenizer = engine.tokenizer
    block_size = engine.model.config.block_size
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def dispatch(events):
            for request, token, finish in events:
                request.sink.put_nowait((request, token, finish))

        def emit(events):
            try:
                loop.call_soon_threadsafe(dispatch, events)
            except RuntimeError:  # the loop closed: the server is shutting down, nobody is waiting
                pass

        app.state.scheduler = Scheduler(engine, emit, max_batch).start()
        yield
        app.state.scheduler.close()

    app = FastAPI(title="SmolHub", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "smolhub"}

    @app.get("/health")
    async def health():
        scheduler = app.state.scheduler
        return {"status": "ok", "model": model_name, "running": scheduler.running,
                "waiting": scheduler.inbox.qsize(), "max_batch": max_batch}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist", "model", "model_not_found")
        return model_card()

    async def read_body(http: HTTPRequest) -> dict:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"could not parse the JSON body of the request ({e}): send a JSON object")
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "you must provide a model parameter", "model")
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`", "model",
                           "model_not_found")
        return body

    def check_context(ids: list[int], max_tokens: int, param: str) -> None:
        if len(ids) + max_tokens > block_size:
            raise APIError(400, f"This model's maximum context length is {block_size} tokens. However, you requested "
                           f"{len(ids) + max_tokens} tokens ({len(ids)} in the {param}, {max_tokens} for the "
                           "completion). Please reduce the length of the prompt or of max_tokens.", param,
                           "context_length_exceeded")

    async def respond(sampling: Sampling, prompts: list[list[int]], stop_ids: set[int], kind: str):
        """Submit every choice and answer with the whole response, or a stream of its chunks."""
        sink: asyncio.Queue = asyncio.Queue()
        choices: dict[Request, Choice] = {}
        for p, ids in enumerate(prompts):
            for request in sampling.requests(ids, stop_ids, sink, p * sampling.n):
                choices[request] = Choice(len(choices), request, tokenizer, sampling.stop)
        for request in choices:
            app.state.scheduler.submit(request)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def usage() -> dict:
            prompt_tokens = sum(len(ids) for ids in prompts)
            completion_tokens = sum(c.n_tokens for c in choices.values())
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        def cancel_all() -> None:
            for request in choices:
                request.cancelled = True  # a finished one is no longer in the batch: nothing happens

        if not sampling.stream:
            texts = {c: "" for c in choices.values()}
            try:
                while not all(c.finish for c in choices.values()):
                    for c, text in (await _updates(sink, choices)).items():
                        texts[c] += text
            finally:
                cancel_all()
            if kind == "chat":
                out = [{"index": c.index, "message": {"role": "assistant", "content": texts[c]},
                        "logprobs": None, "finish_reason": c.finish} for c in choices.values()]
                return JSONResponse({**head, "object": "chat.completion", "choices": out, "usage": usage()})
            out = [{"index": c.index, "text": texts[c], "logprobs": None, "finish_reason": c.finish}
                   for c in choices.values()]
            return JSONResponse({**head, "object": "text_completion", "choices": out, "usage": usage()})

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        no_usage = {"usage": None} if sampling.include_usage else {}

        def chunk(c: Choice, text: str | None, finish: str | None) -> str:
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                if text == "" and finish is None:
                    delta["role"] = "assistant"
                choice = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": c.index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({**head, "object": obj, "choices": [choice], **no_usage})

        # a text chunk is the same JSON but for its text: built once per choice, with the text put in
        text_chunks = {c: chunk(c, _MARK, None).rpartition(json.dumps(_MARK))[::2] for c in choices.values()}

        async def events():
            # what one wake-up gained goes out in one write
            try:
                if kind == "chat":  # the first chunk of each choice names the role, as OpenAI's does
                    yield "".join(chunk(c, "", None) for c in choices.values())
                while not all(c.finish for c in choices.values()):
                    try:
                        gained = await _updates(sink, choices)
                    except APIError as e:
                        yield _sse(e.body())
                        return
                    out = []
                    for c, text in gained.items():
                        if text:
                            before, after = text_chunks[c]
                            out.append(f"{before}{json.dumps(text)}{after}")
                        if c.finish:
                            out.append(chunk(c, None, c.finish))
                    if out:
                        yield "".join(out)
                end = _sse({**head, "object": obj, "choices": [], "usage": usage()}) if sampling.include_usage else ""
                yield end + "data: [DONE]\n\n"
            finally:  # also when the client goes away mid-stream: its rows are freed at the next step
                cancel_all()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await read_body(http)
        sampling = Sampling(body, COMMON | {"prompt"}, 16)
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "prompt must be a string or a non-empty list of strings", "prompt")
        prompts = []
        for text in texts:
            try:
                ids = encode_prompt(tokenizer, text)
            except UserError as e:
                raise APIError(400, str(e), "prompt") from None
            check_context(ids, sampling.max_tokens, "prompt")
            prompts.append(ids)
        return await respond(sampling, prompts, {tokenizer.eos_token_id} - {None}, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = await read_body(http)
        if not chat.has_chat_format(tokenizer):
            raise APIError(400, f"{model_name} has no chat template: fine-tune it to chat first (finetune.py, "
                           "which adds the chat format), or use /v1/completions with a text prompt", "messages")
        sampling = Sampling(body, COMMON | {"messages", "max_completion_tokens"}, None)
        messages = [_message(m) for m in _value(body, "messages", list, [], "a list of messages")]
        try:
            ids = chat.encode_prompt(tokenizer, messages)
        except UserError as e:
            raise APIError(400, str(e), "messages") from None
        if sampling.max_tokens is None:
            sampling.max_tokens = max(block_size - len(ids), 1)
        check_context(ids, sampling.max_tokens, "messages")
        return await respond(sampling, [ids], {tokenizer.eos_token_id, chat.end_of_turn_id(tokenizer)} - {None},
                             "chat")

    return app


def _message(m) -> dict:
    """A chat message as the chat template takes it: text content (a list of text parts is joined), and
    OpenAI's `developer` role read as `system`."""
    if not isinstance(m, dict):
        raise APIError(400, f"each message must be an object with a role and a content, got {m!r}", "messages")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, "this model reads text only: each content part must be {\"type\": \"text\", "
                           "\"text\": ...}", "messages")
        content = "".join(p["text"] for p in content)
    role = "system" if m.get("role") == "developer" else m.get("role")
    return {"role": role, "content": content}


class BackgroundServer:
    """uvicorn serving `app` from a thread of this process (tests, benchmarks): `url` once started."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
