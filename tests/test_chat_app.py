"""The chat demo end to end: StoryLlama/gradio/app.py serving a checkpoint fine-tuned to chat, driven by
headless Chromium and gradio_client.

Needs /usr/bin/chromium (`apt-get install -y chromium`); without it the browser test fails on purpose."""
from pathlib import Path

import pytest

from test_app import ARTIFACTS, ROOT, start, wait_until_up
from test_chat_cli import CONVERSATIONS, make_chat_checkpoint, messages

TOKENS = 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    return make_chat_checkpoint(tmp_path_factory.mktemp("chat-app"))


@pytest.fixture(scope="module")
def url(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "chat.log"
    proc, url = start(["gradio/app.py", "--checkpoint", str(checkpoint)], ROOT / "StoryLlama", log)
    try:
        yield wait_until_up(proc, url, log)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def model(checkpoint):
    from smolhub.inference import load_model

    return load_model(str(checkpoint), device="cpu")


def test_browser_chat_answers_a_two_turn_conversation(url, model, page):
    from playwright.sync_api import expect
    from smolhub.inference import generate_text

    conversation = CONVERSATIONS[0]
    page.goto(url)
    assert page.locator("#prompt").count() == 0  # the chat, not the completion demo
    for label, value in [("Max new tokens", TOKENS), ("Temperature", 0)]:
        control = page.get_by_label(f"number input for {label}")
        control.fill(str(value))
        control.press("Enter")
    page.locator("#seed input").fill("3")
    page.locator("#seed input").press("Tab")
    box, replies = page.locator("#message textarea"), page.locator("#chatbot [data-testid='bot']")
    for turn in range(2):
        box.fill(conversation[2 * turn])
        box.press("Enter")
        # the replies the model was trained on: the second one answers the whole conversation
        expect(replies.nth(turn)).to_have_text(conversation[2 * turn + 1], timeout=30_000)
        expect(page.locator("#stats")).to_contain_text("tokens/s, seed 3", timeout=30_000)
    page.wait_for_timeout(500)  # nothing more arrives after the end of the turn
    assert replies.all_inner_texts() == conversation[1::2]
    assert page.locator("#chatbot [data-testid='user']").all_inner_texts() == conversation[0::2]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    assert conversation[3] == generate_text(model, messages=messages(*conversation[:3]), max_length=TOKENS,
                                            temperature=0)


def test_api_chat_continues_the_clients_conversation(url, model):
    from gradio_client import Client

    client = Client(url, verbose=False)
    conversation = CONVERSATIONS[1]
    first, status = client.predict(conversation[0], TOKENS, 0, 0, 1.0, 1.0, 5, api_name="/chat")
    second, _ = client.predict(conversation[2], TOKENS, 0, 0, 1.0, 1.0, 5, api_name="/chat")
    assert [first, second] == conversation[1::2] and "seed 5" in status
