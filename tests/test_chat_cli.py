"""Chat with a checkpoint fine-tuned to chat: `inference.py --chat` through a pipe, the history it keeps
and cuts to fit the context, its refusals, and `generate_text(messages=...)` against greedy decoding
written out here.

The checkpoint is a tiny StoryLlama given the chat format and trained on the assistant tokens of two
conversations until it replies with them, so that a reply, where it stops, and whether it depends on
the earlier turns are all known."""
import io
import itertools
import runpy
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHAKESPEARE, script_env, tiny_model
from smolhub.errors import UserError
from test_inference_faults import inference_py

# the second reply depends on the first turn: "Another one?" alone is no question the model has seen
CONVERSATIONS = [
    ["Name a colour.", "Red, like a rose.", "Another one?", "Blue, like the sea."],
    ["Name a fruit.", "A pear.", "Another one?", "An apple."],
]


def messages(*texts: str) -> list[dict]:
    """Alternating user and assistant messages, the user's first."""
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]


def make_chat_checkpoint(out_dir, steps: int = 80):
    """A tiny StoryLlama with the chat format (tokens added, embeddings grown), trained on the assistant
    tokens of CONVERSATIONS as SFT does, saved as a checkpoint; returns the checkpoint folder."""
    from smolhub.chat import add_chat_format, encode_chat, fit_embeddings
    from smolhub.checkpoint import save_checkpoint
    from smolhub.tokenizer import train_bpe

    with open(SHAKESPEARE, encoding="utf-8") as f:
        tokenizer = add_chat_format(train_bpe(list(itertools.islice(f, 400)), 320))
    torch.manual_seed(0)
    model = tiny_model("StoryLlama")
    fit_embeddings(model, tokenizer)
    rows = []
    for conversation in CONVERSATIONS:
        ids, mask = encode_chat(tokenizer, messages(*conversation))
        targets = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
        rows.append((torch.tensor([ids[:-1]]), torch.tensor([targets])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = sum(model(x, y)[1] for x, y in rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(out_dir, steps, model.eval(), tokenizer, {"step": steps})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    return make_chat_checkpoint(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """A checkpoint whose tokenizer has no chat template, as pretraining leaves."""
    from smolhub.checkpoint import save_checkpoint
    from smolhub.tokenizer import train_bpe

    with open(SHAKESPEARE, encoding="utf-8") as f:
        tokenizer = train_bpe(list(itertools.islice(f, 400)), 320)
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("plain"), 1, tiny_model("StoryLlama").eval(), tokenizer,
                           {"step": 1})


@pytest.fixture(scope="module")
def model(checkpoint):
    from smolhub.inference import load_model

    return load_model(str(checkpoint), device="cpu")


def reply(model, conversation: list[dict], max_length: int = 40) -> str:
    from smolhub.inference import generate_text

    return generate_text(model, messages=conversation, max_length=max_length, temperature=0)


def chat_in_process(monkeypatch, capsys, stdin: str, *args: str) -> tuple[int, str, str]:
    """`python inference.py --chat ARGS < stdin` in StoryLlama/, run in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return inference_py(monkeypatch, capsys, "--chat", *args)


def test_two_turn_chat_through_a_pipe(checkpoint, model):
    first, second = CONVERSATIONS[0][0], CONVERSATIONS[0][2]
    proc = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(checkpoint), "--chat",
                           "--temperature", "0", "--max_new_tokens", "40"], cwd=REPO / "StoryLlama",
                          env=script_env(), input=f"{first}\n\n{second}\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    # a pipe gets the replies alone, one a line; the blank line is no turn
    assert proc.stdout == f"{CONVERSATIONS[0][1]}\n{CONVERSATIONS[0][3]}\n"
    # the second reply is the reply to the whole history, not to the second message alone
    assert reply(model, messages(*CONVERSATIONS[0][:3])) == CONVERSATIONS[0][3]
    assert reply(model, messages(second)) != CONVERSATIONS[0][3]


def test_chat_keeps_the_history_and_the_system_message(checkpoint, model, monkeypatch, capsys):
    first, second = CONVERSATIONS[1][0], CONVERSATIONS[1][2]
    code, out, err = chat_in_process(monkeypatch, capsys, f"{first}\n{second}\n", "--checkpoint", str(checkpoint),
                                     "--temperature", "0", "--max_new_tokens", "40")
    assert code == 0, err
    assert out == f"{CONVERSATIONS[1][1]}\n{CONVERSATIONS[1][3]}\n"  # the same question, the other history

    # a long system message changes the replies, and stays when the turns before the last no longer fit
    system = {"role": "system", "content": "You are a helpful assistant who answers every question about colours "
              "and fruit in a few words, politely and well."}
    code, out, err = chat_in_process(monkeypatch, capsys, f"{first}\n{second}\n", "--checkpoint", str(checkpoint),
                                     "--temperature", "0", "--max_new_tokens", "10", "--system", system["content"])
    assert code == 0, err
    replies = [reply(model, [system, *messages(first)], 10), reply(model, [system, *messages(second)], 10)]
    assert out == f"{replies[0]}\n{replies[1]}\n"
    assert replies[0] != CONVERSATIONS[1][1] and "left out the oldest 2 messages" in err


def test_chat_leaves_out_the_oldest_turns_to_fit_the_context(checkpoint, model, monkeypatch, capsys):
    from smolhub.chat import encode_prompt

    first, second = CONVERSATIONS[0][0], CONVERSATIONS[0][2]
    block = model.model.config.block_size
    history = messages(*CONVERSATIONS[0][:3])
    # room for the last message and the reply, not for the whole history and the reply
    new = block - len(encode_prompt(model.tokenizer, messages(second))) - 4
    assert len(encode_prompt(model.tokenizer, history)) + new > block
    code, out, err = chat_in_process(monkeypatch, capsys, f"{first}\n{second}\n", "--checkpoint", str(checkpoint),
                                     "--temperature", "0", "--max_new_tokens", str(new))
    assert code == 0, err
    assert out == f"{CONVERSATIONS[0][1]}\n{reply(model, messages(second), new)}\n"
    assert "left out the oldest 2 messages" in err and f"context of {block}" in err

    # a system message stays, and what is kept is the longest recent history that fits, from a user turn
    system = {"role": "system", "content": "Be brief."}
    long = [system, *messages(*CONVERSATIONS[0], *CONVERSATIONS[1][:3])]
    for new in [8, 40, 80]:
        kept = model.fit_chat(long, new)
        assert kept[0] == system and kept[1]["role"] == "user" and kept[-1] == long[-1]
        assert len(encode_prompt(model.tokenizer, kept)) + new <= block
        one_more = long[len(long) - len(kept) - 1:]  # the exchange before the kept ones, too
        assert len(encode_prompt(model.tokenizer, [system, *one_more])) + new > block


def test_chat_refusals(checkpoint, plain_checkpoint, monkeypatch, capsys):
    code, out, err = chat_in_process(monkeypatch, capsys, "Hello\n", "--checkpoint", str(plain_checkpoint))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no chat template" in err and "finetune.py" in err
    code, _, err = chat_in_process(monkeypatch, capsys, "", "--checkpoint", str(checkpoint), "--prompt", "Hi",
                                   "--json")
    assert code == 2 and "drop --prompt, --json" in err
    monkeypatch.setattr(sys, "argv", ["inference.py", "--checkpoint", str(checkpoint), "--system", "Be brief."])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path("inference.py", run_name="__main__")
    assert exit_.value.code == 2 and "add --chat" in capsys.readouterr().err


def test_generate_text_with_messages_is_the_greedy_reply_up_to_the_end_of_turn(model, plain_checkpoint):
    from smolhub.chat import encode_prompt, end_of_turn_id
    from smolhub.inference import generate_text, load_model

    conversation = messages(*CONVERSATIONS[1][:3])
    ids = encode_prompt(model.tokenizer, conversation)
    end = end_of_turn_id(model.tokenizer)
    greedy = []
    with torch.inference_mode():  # a full forward per token, no cache
        while len(greedy) < 40:
            logits = model.model(torch.tensor([ids + greedy]))[0]
            greedy.append(int(logits[0, -1].argmax()))
            if greedy[-1] == end:
                break
    assert greedy[-1] == end and len(greedy) > 1  # the reply ended its turn, before max_length
    expected = model.tokenizer.decode(greedy[:-1])
    assert expected == CONVERSATIONS[1][3]
    assert generate_text(model, messages=conversation, max_length=40, temperature=0) == expected
    assert "".join(generate_text(model, messages=conversation, max_length=40, temperature=0, stream=True)) == expected
    # a text prompt is continued as before: past the end-of-turn token, up to EOS or max_length
    text = model.tokenizer.decode(ids)
    continued = generate_text(model, text, max_length=len(greedy) + 5, temperature=0)
    assert continued.startswith(text + expected + "<|im_end|>")

    with pytest.raises(UserError, match="either prompt= .* or messages="):
        generate_text(model, "Once", messages=conversation)
    with pytest.raises(UserError, match="no chat template"):
        generate_text(load_model(str(plain_checkpoint), device="cpu"), messages=conversation)
    with pytest.raises(UserError, match="message 0"):
        generate_text(model, messages=[{"role": "robot", "content": "hi"}])


def test_a_reply_through_the_graph_decoders_static_cache_ends_its_turn_too(checkpoint, monkeypatch):
    """On CPU no CUDA graph is captured: its replay is stood in for by the eager step on the decoder's
    static cache (as in test_engine.py), which is everything the engine does around the graph."""
    from smolhub.generate import GraphDecoder
    from smolhub.inference import load_model

    monkeypatch.setattr(GraphDecoder, "usable", staticmethod(lambda model, device: True))
    monkeypatch.setattr(GraphDecoder, "_replay", GraphDecoder._forward)
    engine = load_model(str(checkpoint), device="cpu")
    for conversation in CONVERSATIONS:
        assert reply(engine, messages(*conversation[:3])) == conversation[3]
    assert engine._decoders  # the replies went through a decoder


@pytest.mark.cuda
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled-graph"])
def test_chat_on_cuda_gives_the_replies_it_was_trained_on(checkpoint, compile):
    from smolhub.inference import load_model

    engine = load_model(str(checkpoint), device="cuda", dtype="float32", compile=compile)
    for conversation in CONVERSATIONS:
        assert reply(engine, messages(conversation[0])) == conversation[1]
        assert reply(engine, messages(*conversation[:3])) == conversation[3]
    assert engine._decoders and not engine.graph_failed
