import socket
import time

import pytest

from conftest import GPT2_DIR, SHAKESPEARE
from smolhub.errors import UserError
from smolhub.tokenizer import (EOS, MODEL_MAX_LENGTH, build_tokenizer, gpt2_tokenizer, hub_reachable,
                               load_tokenizer, tokenizer_fingerprint, train_bpe)

TRICKY = "Hello , world . It's  two  spaces\n\n\ttab, ünïcödé 😀 don 't <|endoftext|>after"


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer(str(GPT2_DIR))


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return SHAKESPEARE.read_text()


@pytest.fixture(scope="module")
def bpe(shakespeare):
    return train_bpe([shakespeare], 1000)


def test_gpt2_from_vocab_and_merges(gpt2):
    assert gpt2("Hello world")["input_ids"] == [15496, 995]
    assert gpt2.eos_token == EOS and gpt2.eos_token_id == 50256
    assert len(gpt2) == 50257
    assert gpt2.model_max_length == MODEL_MAX_LENGTH
    assert gpt2.decode(gpt2(TRICKY)["input_ids"]) == TRICKY
    assert gpt2(EOS)["input_ids"] == [50256]  # the separator is one token, not its characters


def test_gpt2_saved_folder_and_build_tokenizer_agree(gpt2, tmp_path):
    gpt2.save_pretrained(tmp_path)
    for tok in (gpt2_tokenizer(str(tmp_path)), load_tokenizer(tmp_path), build_tokenizer(
            str(tmp_path), texts=lambda: [], bpe_vocab_size=0, cache_dir=str(tmp_path / "c"))):
        assert tok("Hello world")["input_ids"] == [15496, 995]
        assert tok.decode(tok(TRICKY)["input_ids"]) == TRICKY
        assert tok.eos_token_id == 50256
        assert tok.model_max_length == MODEL_MAX_LENGTH
        assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(gpt2)
    from_vocab = build_tokenizer(str(GPT2_DIR), lambda: [], 0, str(tmp_path / "c"))
    assert from_vocab("Hello world")["input_ids"] == [15496, 995]


def test_unreachable_hub_tokenizer_is_a_fast_user_error():
    # an id no cache can hold: with the Hub unreachable (as here) or reachable, it is a UserError
    start = time.monotonic()
    with pytest.raises(UserError, match="--tokenizer path/to/folder_with_vocab.json_and_merges.txt"):
        gpt2_tokenizer("smolhub-tests/no-such-tokenizer")
    assert time.monotonic() - start < 10


def test_hub_probe_is_bounded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as silent:  # accepts connections (the backlog does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        assert not hub_reachable(timeout=1.0)
        assert time.monotonic() - start < 2.0


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(UserError, match="unknown tokenizer"):
        build_tokenizer("gpt5", lambda: [], 1000, str(tmp_path))
    with pytest.raises(UserError, match="neither tokenizer.json nor vocab.json"):
        gpt2_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(UserError, match="is a file"):
        gpt2_tokenizer(str(tmp_path / "vocab.json"))


def test_trained_bpe_round_trips_and_is_deterministic(bpe, shakespeare, tmp_path):
    assert len(bpe) == 1000
    assert bpe.eos_token == EOS and bpe.eos_token_id == 0
    ids = bpe(shakespeare[:20_000])["input_ids"]
    assert bpe.decode(ids) == shakespeare[:20_000]
    assert len(ids) < 20_000 / 2  # it learned merges, not just bytes
    assert bpe.decode(bpe(TRICKY)["input_ids"]) == TRICKY  # unseen characters go through bytes
    assert tokenizer_fingerprint(train_bpe([shakespeare], 1000)) == tokenizer_fingerprint(bpe)
    bpe.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded(TRICKY)["input_ids"] == bpe(TRICKY)["input_ids"]
    assert loaded.eos_token_id == 0 and tokenizer_fingerprint(loaded) == tokenizer_fingerprint(bpe)


def test_bpe_vocab_too_small():
    with pytest.raises(UserError, match="at least 257"):
        train_bpe(["abc"], 256)


def test_build_bpe_is_cached(tmp_path, bpe, shakespeare):
    calls = []

    def texts():
        calls.append(1)
        return [shakespeare]

    first = build_tokenizer("bpe", texts, 1000, str(tmp_path), cache_key="shakespeare")
    second = build_tokenizer("bpe", texts, 1000, str(tmp_path), cache_key="shakespeare")
    assert len(calls) == 1  # the second run loaded the cached tokenizer instead of training
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second) == tokenizer_fingerprint(bpe)
    build_tokenizer("bpe", texts, 600, str(tmp_path), cache_key="shakespeare")
    build_tokenizer("bpe", texts, 1000, str(tmp_path), cache_key="other data")
    assert len(calls) == 3
    assert sorted(p.name.startswith(".") for p in tmp_path.iterdir()) == [False] * 3  # no temp folders


def test_fingerprint_separates_tokenizers_and_ignores_call_options(gpt2, bpe):
    before = tokenizer_fingerprint(gpt2)
    gpt2(["a b c d e f"], truncation=True, max_length=3)
    assert tokenizer_fingerprint(gpt2) == before
    assert tokenizer_fingerprint(bpe) != before
    assert len(before) == 16
