"""The OpenAI-compatible server, spoken to by the official `openai` client over HTTP: a real uvicorn
serving a tiny chat checkpoint (test_chat_cli's, which answers "Name a colour." with "Red, like a
rose.") from a thread of this process, and once `python -m smolhub.serve` as a user starts it."""
import concurrent.futures
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import REPO, script_env
from test_chat_cli import make_chat_checkpoint, plain_checkpoint  # noqa: F401  (a fixture)

NAME = "tiny-chat"
COLOUR = [{"role": "user", "content": "Name a colour."}]


# on CUDA every decode step is one captured CUDA graph (model and sampling): the same tests hold there
@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def server(request, tmp_path_factory, one_thread):
    from smolhub.inference import load_model
    from smolhub.serve.api import BackgroundServer, create_app

    engine = load_model(str(make_chat_checkpoint(tmp_path_factory.mktemp("chat"))), device=request.param)
    app = create_app(engine, NAME, max_batch=16)
    with BackgroundServer(app) as running:
        running.engine, running.scheduler = engine, app.state.scheduler
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(client, prompt="The king", **kwargs) -> str:
    return client.completions.create(model=NAME, prompt=prompt, **kwargs).choices[0].text


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0


def test_streamed_and_whole_completions_give_the_same_text_for_a_seed(client):
    whole = client.completions.create(model=NAME, prompt="The king", max_tokens=24, temperature=1.0, seed=7)
    chunks = list(client.completions.create(model=NAME, prompt="The king", max_tokens=24, temperature=1.0, seed=7,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text and len(streamed) > 10
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert complete(client, max_tokens=24, temperature=1.0, seed=8) != streamed


def test_chat_replies_in_the_checkpoint_template(server, client):
    from smolhub import chat

    reply = client.chat.completions.create(model=NAME, messages=COLOUR, temperature=0)
    assert reply.choices[0].message.content == "Red, like a rose."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(chat.encode_prompt(server.engine.tokenizer, COLOUR))
    chunks = list(client.chat.completions.create(model=NAME, messages=COLOUR, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Red, like a rose."


def test_stop_strings_cut_the_text_across_tokens_and_are_never_sent(server, client):
    tokenizer = server.engine.tokenizer
    full = client.chat.completions.create(model=NAME, messages=COLOUR, temperature=0).choices[0].message.content
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(full, add_special_tokens=False)]
    boundary = len(pieces[0]) + len(pieces[1])
    stop = full[boundary - 2:boundary + 2]  # the end of one token and the start of the next
    assert len(stop) == 4 and full.count(stop) == 1
    for stream in (False, True):
        kwargs = dict(model=NAME, messages=COLOUR, temperature=0, stop=["never there", stop], stream=stream)
        if stream:
            chunks = list(client.chat.completions.create(**kwargs))
            sent = [c.choices[0].delta.content or "" for c in chunks]
            text, finish = "".join(sent), chunks[-1].choices[0].finish_reason
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
            text, finish = choice.message.content, choice.finish_reason
        assert text == full[:boundary - 2] and finish == "stop"


def test_max_tokens_ends_with_length_and_usage_counts_every_choice(server, client):
    response = client.completions.create(model=NAME, prompt="The king", max_tokens=5, n=2, temperature=1.5, seed=3)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.finish_reason for c in response.choices] == ["length", "length"]
    assert response.choices[0].text != response.choices[1].text  # each choice draws its own tokens
    prompt_tokens = len(server.engine.tokenizer.encode("The king", add_special_tokens=False))
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == \
        (prompt_tokens, 10, prompt_tokens + 10)


def test_bad_requests_are_openai_errors_naming_the_parameter(server, client):
    for param, value in (("temperature", -1), ("top_p", 2), ("max_tokens", 0), ("n", 0)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, prompt="The king", **{param: value})
        assert e.value.param == param
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="The king", frequency_penalty=0.5)
    assert e.value.param == "frequency_penalty"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="The king")
    assert e.value.code == "model_not_found"
    block = server.engine.model.config.block_size
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="The king", max_tokens=block)
    assert e.value.code == "context_length_exceeded" and str(block) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "to be or not " * 60}])
    assert e.value.code == "context_length_exceeded"
    malformed = httpx.post(server.url + "/v1/completions", content=b"{\"model\": ",
                           headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400 and set(malformed.json()["error"]) == {"message", "type", "param", "code"}


def test_concurrent_clients_are_batched_and_get_what_their_seed_gives_alone(server, client):
    requests = [dict(prompt=("The king", "Once upon", "O Romeo")[i % 3], max_tokens=48, seed=100 + i,
                     temperature=(0.0, 0.8, 1.0, 1.3)[i % 4], top_p=(1.0, 0.9)[i % 2],
                     extra_body={"top_k": (0, 20)[i % 3 == 0]}) for i in range(16)]
    server.scheduler.max_batch_seen = 0
    alone = [complete(client, **r) for r in requests]
    assert server.scheduler.max_batch_seen == 1
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: complete(client, **r), requests))
    assert together == alone
    assert server.scheduler.max_batch_seen >= 8
    assert server.scheduler.use_graphs == (server.scheduler.device.type == "cuda")  # no fallback to eager


def test_rows_that_end_at_different_steps_and_are_refilled_give_each_request_its_own_tokens(server, client):
    # rows end and are refilled while the next step is already launched: no request may get a token
    # computed for the row's previous holder, nor lose one
    requests = [dict(prompt=("The king", "O Romeo")[i % 2], max_tokens=(1, 2, 5, 11)[i % 4], seed=200 + i,
                     temperature=1.0) for i in range(12)]
    alone = [client.completions.create(model=NAME, **r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # 12 requests in 6 rows: each row is refilled
        together = list(pool.map(lambda r: client.completions.create(model=NAME, **r), requests))
    assert [r.choices[0].text for r in together] == [r.choices[0].text for r in alone]
    assert [r.usage.completion_tokens for r in together] == [r.usage.completion_tokens for r in alone]
    assert [r.choices[0].finish_reason for r in together] == [r.choices[0].finish_reason for r in alone]
    assert sum(r.choices[0].finish_reason == "length" for r in alone) >= 6
    assert server.scheduler.use_graphs == (server.scheduler.device.type == "cuda")


def test_a_cancelled_stream_frees_its_row_and_the_others_finish(server, client):
    block = server.engine.model.config.block_size
    scheduler = server.scheduler
    scheduler.steps = 0

    def finish(seed):
        return client.completions.create(model=NAME, prompt="The king", max_tokens=40, seed=seed,
                                         temperature=1.0).choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        long = client.completions.create(model=NAME, prompt="The king", max_tokens=block - 8, temperature=1.0,
                                         seed=1, stream=True)
        others = [pool.submit(finish, seed) for seed in (2, 3)]
        for _, _ in zip(range(3), long):
            pass
        long.close()  # the client goes away mid-stream
        assert [f.result() for f in others] == ["length", "length"]
    deadline = time.monotonic() + 10
    while scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.running == 0
    assert scheduler.steps < block - 30  # the long request stopped with the client, not at its max_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_smolhub_serve_serves_a_checkpoint(plain_checkpoint, tmp_path):  # noqa: F811
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "smolhub.serve", "--checkpoint", str(plain_checkpoint),
                             "--port", str(port), "--device", "cpu"], cwd=REPO, env=script_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start in 60 s"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        name = plain_checkpoint.name  # --model_name defaults to the checkpoint folder's name
        assert [m.id for m in client.models.list().data] == [name]
        text = client.completions.create(model=name, prompt="The king", max_tokens=8, temperature=0).choices[0].text
        assert text
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=name, messages=COLOUR)
        assert "fine-tune" in e.value.message
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    missing = subprocess.run([sys.executable, "-m", "smolhub.serve", "--checkpoint", str(tmp_path / "nowhere")],
                             cwd=REPO, env=script_env(tmp_path), capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_an_moe_that_drops_tokens_over_capacity_is_served_one_request_at_a_time():
    """Capacity is shared by every token of a step, so batching would couple the requests' replies."""
    from conftest import GPT2_DIR, tiny_model
    from transformers import GPT2TokenizerFast

    from smolhub.errors import UserError
    from smolhub.generate import Engine
    from smolhub.serve.batching import Scheduler

    engine = Engine(tiny_model("SmolMixtral", capacity_factor=1.25), GPT2TokenizerFast.from_pretrained(GPT2_DIR))
    with pytest.raises(UserError, match=r"capacity_factor 1.25.*serve it with --max_batch 1$"):
        Scheduler(engine, emit=lambda events: None, max_batch=4)
    assert Scheduler(engine, emit=lambda events: None, max_batch=1).max_batch == 1
