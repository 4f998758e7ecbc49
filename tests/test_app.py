"""The web demo end to end: the real entry points in subprocesses, driven by headless Chromium and gradio_client.

Needs /usr/bin/chromium (`apt-get install -y chromium`); without it the browser tests fail on purpose.
"""
import itertools
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from conftest import CHROMIUM, CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ARTIFACTS = ROOT / "test-artifacts"
ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
PROMPT = "Once upon a time"
TOKENS = 40  # new tokens per request in most tests
LONG_PROMPT = " ".join([PROMPT] * 110)
BLOCK_SIZE = 512  # of the test model; the apps' default limit on new tokens is 512 too


def expected(model, prompt=PROMPT, max_length=TOKENS, temperature=0.8, top_k=0, top_p=1.0,
             repetition_penalty=1.0, seed=7):
    """What the app must show: the reference implementation, run in this process."""
    from smolhub.inference import generate_text

    return generate_text(model, prompt, max_length, temperature, top_k, top_p, repetition_penalty, seed)


def make_checkpoint(out_dir: Path, seed: int) -> Path:
    from smolhub.checkpoint import save_checkpoint
    from smolhub.tokenizer import train_bpe
    from StoryLlama.config import StoryLlamaConfig
    from StoryLlama.model import StoryLlama

    with open(DATA / "tinyshakespeare" / "input.txt", encoding="utf-8") as f:
        tokenizer = train_bpe(list(itertools.islice(f, 400)), 512)
    torch.manual_seed(seed)
    model = StoryLlama(StoryLlamaConfig(vocab_size=512, block_size=BLOCK_SIZE, n_layer=2, n_embd=128, n_head=4,
                                        n_kv_heads=2, ffn_hidden=256))
    meta = {"step": 3, "tokens_seen": 12288, "val_loss": 6.2383, "dataset": "tinyshakespeare",
            "params": model.num_params(), "active_params": model.num_active_params()}
    save_checkpoint(out_dir, 3, model, tokenizer, meta, trainer_state={"step": 3})
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], cwd: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    # output goes to a file: a pipe nobody reads would stall the app once full
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *args, "--port", str(port)], cwd=cwd, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}/"


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"the app did not answer within {timeout}s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("app")
    return make_checkpoint(base / "a", seed=0), make_checkpoint(base / "b", seed=1)


@pytest.fixture(scope="session")
def apps(checkpoints, tmp_path_factory):
    """The StoryLlama demo and the comparison app, started together so their start-ups overlap."""
    a, b = checkpoints
    logs = tmp_path_factory.mktemp("logs")
    demo, demo_url = start(["gradio/app.py", "--checkpoint", str(a), "--concurrency", "4"], ROOT / "StoryLlama",
                           logs / "demo.log")
    compare, compare_url = start(["-m", "smolhub.app", "compare", "--checkpoints", str(a), str(b)], ROOT,
                                 logs / "compare.log")
    try:
        yield (wait_until_up(demo, demo_url, logs / "demo.log"),
               wait_until_up(compare, compare_url, logs / "compare.log"))
    finally:
        for proc in (demo, compare):
            proc.terminate()
            proc.wait(10)


@pytest.fixture(scope="session")
def url(apps):
    return apps[0]


@pytest.fixture(scope="session")
def model(checkpoints):
    from smolhub.inference import load_model

    return load_model(str(checkpoints[0]), device="cpu")


@pytest.fixture(scope="session")
def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def textarea_value(text: str) -> str:
    # a textarea reports every line break as \n, and random weights do sample the \r byte token
    return text.replace("\r\n", "\n").replace("\r", "\n")


def set_prompt(page, text: str) -> None:
    # set through the DOM so that a lone surrogate, which no keyboard produces, reaches the app as is
    page.locator("#prompt textarea").evaluate(
        "(el, text) => { el.value = text; el.dispatchEvent(new Event('input', {bubbles: true})); }", text)


def set_controls(page, max_new_tokens: int, seed: int) -> None:
    tokens = page.get_by_label("number input for Max new tokens")
    tokens.fill(str(max_new_tokens))
    tokens.press("Enter")
    page.locator("#seed input").fill(str(seed))
    page.locator("#seed input").press("Tab")


def test_browser_streams_the_same_text_as_generate_text(url, page, model):
    page.goto(url)
    set_prompt(page, PROMPT)
    set_controls(page, TOKENS, seed=7)
    page.locator("#generate").click()
    page.locator("#stats").get_by_text("tokens/s").wait_for(timeout=30_000)
    shown = page.locator("#output textarea").input_value()
    assert shown == textarea_value(expected(model))
    assert "seed 7" in page.locator("#stats").inner_text()
    card = page.locator("#model-card").inner_text()
    for fact in ["StoryLlama", "Parameters", "12,288", "6.2383", "tinyshakespeare", "ckpt-0000003"]:
        assert fact in card
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)


def test_browser_shows_bad_input_and_keeps_serving(url, page, model):
    page.goto(url)
    page.locator("#prompt textarea").wait_for()
    for bad, message in [("   ", "the prompt is empty"), ("a\ud800b", "lone surrogate")]:
        set_prompt(page, bad)
        page.locator("#generate").click()
        page.get_by_text(message).first.wait_for(timeout=15_000)
    set_prompt(page, PROMPT)
    set_controls(page, TOKENS, seed=7)
    page.locator("#generate").click()
    page.locator("#stats").get_by_text("tokens/s").wait_for(timeout=30_000)
    assert page.locator("#output textarea").input_value() == textarea_value(expected(model))


def test_stop_button_cancels_the_stream(url, page):
    page.goto(url)
    set_prompt(page, PROMPT)
    # a short generation first, so the page is past its start-up work when the long one streams
    set_controls(page, 2, seed=1)
    page.locator("#generate").click()
    page.locator("#stats").get_by_text("tokens/s").wait_for(timeout=30_000)
    # a prompt longer than the context: every step re-reads the whole window, so the stream takes
    # seconds on any machine, and this seed runs all 511 tokens without sampling EOS
    set_prompt(page, LONG_PROMPT)
    set_controls(page, BLOCK_SIZE - 1, seed=1)
    # The page itself presses Stop as soon as the first piece (and the status "Generating...") shows,
    # and notes whether the speed line, written only when a generation ends, appears after that:
    # a round trip through playwright can be slower than the whole generation on a busy machine.
    page.locator("#stats").evaluate("""stats => {
        window.finished = false;
        let started = false;
        new MutationObserver(() => {
            if (!started && stats.innerText.includes('Generating...')) {
                started = true;
                document.querySelector('#stop').click();
            } else if (started && stats.innerText.includes('tokens/s')) {
                window.finished = true;
            }
        }).observe(stats, {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#generate").click()
    page.locator("#stats").get_by_text("Stopped.").wait_for(timeout=30_000)
    stopped = page.locator("#output textarea").input_value()
    time.sleep(1.0)
    assert page.locator("#output textarea").input_value() == stopped  # nothing arrives after the stop
    assert stopped.startswith(LONG_PROMPT) and not page.evaluate("window.finished")


def test_api_generate_streams_and_matches(client, model):
    assert client.predict(PROMPT, api_name="/generate").startswith(PROMPT)  # every other input defaulted
    job = client.submit(PROMPT, TOKENS, 0.9, 50, 0.95, 1.1, 11, api_name="/generate")
    final = job.result()
    assert final == expected(model, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=11)
    steps = job.outputs()
    assert len(steps) > 1 and steps[-1] == final  # streamed, the text growing piece by piece
    assert all(final.startswith(s) for s in steps)


def test_api_answers_concurrent_requests(client, model):
    prompts = [f"{PROMPT} {i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: client.predict(p, 24, seed=3, api_name="/generate"), prompts))
    assert answers == [expected(model, p, max_length=24, seed=3) for p in prompts]


def test_api_rejects_bad_input_and_keeps_serving(url, client):
    from gradio_client.exceptions import AppError

    for kwargs, message in [({"prompt": ""}, "prompt is empty"),
                            ({"prompt": PROMPT, "max_new_tokens": 10_000}, "between 1 and 512"),
                            ({"prompt": "x" * 2001}, "limit of 2000"),
                            ({"prompt": PROMPT, "top_p": 0}, "top_p"),
                            ({"prompt": PROMPT, "temperature": "hot"}, "temperature must be a finite number")]:
        with pytest.raises(AppError, match=message):
            client.predict(**kwargs, api_name="/generate")
    # gradio_client cannot even encode a lone surrogate, so send the JSON escape by hand
    body = b'{"data": ["a\\ud800b", 10, 0.8, 0, 1.0, 1.0, 1]}'
    event = httpx.post(f"{url}gradio_api/call/generate", content=body,
                       headers={"content-type": "application/json"}).json()["event_id"]
    reply = httpx.get(f"{url}gradio_api/call/generate/{event}", timeout=30).text
    assert "event: error" in reply and "lone surrogate" in reply
    assert client.predict(PROMPT, 5, api_name="/generate").startswith(PROMPT)


def test_compare_app_shows_outputs_side_by_side(apps, page, checkpoints):
    from smolhub.inference import load_model

    page.goto(apps[1])
    set_prompt(page, PROMPT)
    set_controls(page, TOKENS, seed=5)
    page.locator("#generate").click()
    for i, ckpt in enumerate(checkpoints):
        page.locator(f"#stats-{i}").get_by_text("tokens/s").wait_for(timeout=30_000)
        shown = page.locator(f"#output-{i} textarea").input_value()
        assert shown == textarea_value(expected(load_model(str(ckpt), device="cpu"), seed=5))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)


def test_compare_app_stop_ends_every_stream_with_stopped_last(apps, page):
    page.goto(apps[1])
    set_prompt(page, LONG_PROMPT)
    set_controls(page, BLOCK_SIZE - 1, seed=1)
    page.locator("#stats-0").evaluate("""stats => new MutationObserver((_, observer) => {
        if (stats.innerText.includes('Generating...')) {
            observer.disconnect();
            document.querySelector('#stop').click();
        }
    }).observe(stats, {subtree: true, childList: true, characterData: true})""")
    page.locator("#generate").click()
    for i in range(2):
        page.locator(f"#stats-{i}").get_by_text("Stopped.").wait_for(timeout=30_000)
    stopped = [page.locator(f"#output-{i} textarea").input_value() for i in range(2)]
    time.sleep(1.0)
    assert [page.locator(f"#output-{i} textarea").input_value() for i in range(2)] == stopped
    assert all(text.startswith(LONG_PROMPT) for text in stopped)
    assert all("tokens/s" not in page.locator(f"#stats-{i}").inner_text() for i in range(2))


def test_cli_refuses_bad_arguments(checkpoints):
    from smolhub.app import cli, main
    from smolhub.errors import UserError

    with pytest.raises(UserError, match="--checkpoint is required"):
        main("StoryLlama", [])
    with pytest.raises(UserError, match="not SmolMixtral"):
        main("SmolMixtral", ["--checkpoint", str(checkpoints[0])])
    with pytest.raises(UserError, match="at least two"):
        cli(["compare", "--checkpoints", str(checkpoints[0])])
    with pytest.raises(UserError, match="usage"):
        cli([])
