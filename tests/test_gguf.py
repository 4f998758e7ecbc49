"""GGUF export run by llama.cpp itself (llama-cpp-python): for every architecture llama.cpp implements,
with GPT-2's tokenizer and with a BPE trained on the corpus (plus the chat tokens), llama.cpp gives our
token ids and our logits; the two architectures it cannot compute are refused."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.gguf_agreement import greedy_pair, llama_logits, open_llama, our_logits, tiny_trained
from conftest import GPT2_DIR, SHAKESPEARE, tiny_model
from smolhub.chat import IM_END, IM_START, add_chat_format
from smolhub.checkpoint import save_checkpoint
from smolhub.config import pad_vocab
from smolhub.errors import UserError
from smolhub.tokenizer import gpt2_tokenizer, train_bpe
from smolhub_hub.cli import main as hub_main
from smolhub_hub.gguf import export_gguf

# StoryMixtral with a 64-token window, so a prompt plus 32 generated tokens stays where llama.cpp is exact;
# StoryKimi's two tokenizers cover both query paths (direct and low-rank) and a missing shared expert
VARIANTS = {
    ("StoryLlama", "gpt2"): {}, ("StoryLlama", "bpe"): {},
    ("StoryMixtral", "gpt2"): {"sliding_window": 64}, ("StoryMixtral", "bpe"): {"sliding_window": 64},
    ("StoryKimi", "gpt2"): {"q_lora_rank": 32, "n_shared_experts": 0, "routed_scaling_factor": 1.5},
    ("StoryKimi", "bpe"): {},
}
PROMPTS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
           "  two  spaces, a tab\tand a trailing space ",
           "digits 12345 and 3.14159, 2024-12-07",
           "unicode: héllo wörld — “quotes” 日本語 🙂 ﬁ",
           "new\n\n\nlines\r\nand it's we'll THEY'RE  \n"]
CHAT = f"{IM_START}user\nHi there!{IM_END}\n{IM_START}assistant\n"


@pytest.fixture(scope="module")
def tokenizers():
    text = SHAKESPEARE.read_text()[:100_000]
    bpe = add_chat_format(train_bpe([text[i:i + 2000] for i in range(0, len(text), 2000)], 300))
    return {"gpt2": gpt2_tokenizer(str(GPT2_DIR)), "bpe": bpe}


class Exported:
    """One briefly trained tiny checkpoint and its GGUF files, exported once per dtype."""

    def __init__(self, arch: str, tokenizer, root: Path, **overrides):
        self.arch, self.tokenizer, self.root = arch, tokenizer, root
        self.model = tiny_trained(arch, tokenizer, SHAKESPEARE.read_text()[:20_000], **overrides)
        self.checkpoint = save_checkpoint(root / "ckpt", 20, self.model, tokenizer, {"step": 20})
        self.files = {}

    def gguf(self, dtype: str):
        if dtype not in self.files:
            self.files[dtype] = export_gguf(str(self.checkpoint), self.root / f"gguf-{dtype}", dtype)
        return self.files[dtype]

    def llama(self, dtype: str):
        return open_llama(self.gguf(dtype).path)

    def logits(self, ids: list[int], model=None) -> np.ndarray:
        return our_logits(model or self.model, ids)


@pytest.fixture(scope="module")
def exported(tokenizers, tmp_path_factory, one_thread):
    cache = {}

    def get(arch: str, tok: str) -> Exported:
        if (arch, tok) not in cache:
            cache[arch, tok] = Exported(arch, tokenizers[tok], tmp_path_factory.mktemp(f"{arch}-{tok}"),
                                        **VARIANTS[arch, tok])
        return cache[arch, tok]
    return get


def prompt_ids(e: Exported) -> list[int]:
    """A prompt within StoryMixtral's window, where llama.cpp computes our function exactly."""
    return e.tokenizer.encode(PROMPTS[0] + " " + PROMPTS[2])[:48]


@pytest.mark.parametrize("arch,tok", VARIANTS)
def test_llama_cpp_tokenizes_to_our_ids(arch, tok, exported):
    e = exported(arch, tok)
    llm = e.llama("f32")
    for text in PROMPTS:
        assert llm.tokenize(text.encode(), add_bos=False) == e.tokenizer.encode(text), text
    if tok == "bpe":  # the chat tokens: one id each, as control tokens; <|im_end|> ends a turn
        assert llm.tokenize(CHAT.encode(), add_bos=False, special=True) == e.tokenizer.encode(CHAT)
        assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == e.tokenizer.convert_tokens_to_ids(IM_END)
        assert "{% generation %}" not in llm.metadata["tokenizer.chat_template"]
    assert int(llm.metadata["tokenizer.ggml.eos_token_id"]) == e.tokenizer.eos_token_id
    assert llm.n_vocab() == e.model.config.vocab_size  # the padding rows are (unused) tokens too
    llm.close()


@pytest.mark.parametrize("arch,tok", VARIANTS)
def test_f32_logits_match_ours(arch, tok, exported):
    """fp32 on both sides: only summation order and ggml's exp/silu differ, ~1e-6 relative on logits of a
    few units; 1e-4 leaves room for that and is far below any mapping error (O(0.1) or more)."""
    e = exported(arch, tok)
    ids = prompt_ids(e)
    llm = e.llama("f32")
    assert np.abs(llama_logits(llm, ids) - e.logits(ids)).max() < 1e-4
    llm.close()


def rounded_weights(model, dtype: torch.dtype):
    """A copy of `model` whose matrices went through `dtype`, as the GGUF stores them (norms, biases and
    the routers stay fp32 there)."""
    rounded = type(model)(model.config).eval()
    rounded.load_state_dict({name: t.to(dtype).float() if t.dim() >= 2 and "router" not in name else t
                             for name, t in model.state_dict().items()})
    return rounded


@pytest.mark.parametrize("arch,tok", VARIANTS)
def test_f16_logits_match_ours_within_rounding(arch, tok, exported):
    """llama.cpp rounds both operands of each f16 matmul, the weight and the activation, by up to 2^-11
    relative. Rounding the weights alone moves our logits by some d (4e-4 to 1.1e-3 here); both roundings
    together stay within a few d (2.4 d at most here), hence 4 d; a mapping error would be O(0.1)."""
    e = exported(arch, tok)
    ids = prompt_ids(e)
    ours = e.logits(ids)
    weight_rounding = np.abs(e.logits(ids, rounded_weights(e.model, torch.float16)) - ours).max()
    llm = e.llama("f16")
    assert np.abs(llama_logits(llm, ids) - ours).max() <= 4 * weight_rounding + 1e-4
    llm.close()


@pytest.mark.parametrize("arch,tok", VARIANTS)
def test_q8_0_gives_our_greedy_continuation(arch, tok, exported):
    """8-bit weights move logits by ~1e-2: the same 32 greedy tokens, decoded by llama.cpp through its KV cache."""
    e = exported(arch, tok)
    llm = e.llama("q8_0")
    ours, theirs = greedy_pair(e.model, llm, e.tokenizer.encode("First Citizen:"), 32, len(e.tokenizer))
    llm.close()
    assert theirs == ours


def test_storymixtral_is_exact_up_to_the_window_then_attends_to_everything(exported):
    e = exported("StoryMixtral", "bpe")
    window = e.model.config.sliding_window
    ids = (e.tokenizer.encode(SHAKESPEARE.read_text()[:2000]) * 2)[:window + 8]
    llm = e.llama("f32")
    diff = np.abs(llama_logits(llm, ids) - e.logits(ids)).max(axis=-1)
    llm.close()
    assert diff[:window].max() < 1e-4  # tokens 1..window: every key is inside our window too
    assert diff[window:].min() > 1e-3  # from token window+1 on, llama.cpp also sees the tokens we drop
    assert f"first {window} tokens" in e.gguf("f32").exact


def test_cli_writes_one_gguf_and_says_what_it_computes(exported, tmp_path, capsys):
    e = exported("StoryMixtral", "bpe")
    hub_main(["export", str(e.checkpoint), str(tmp_path / "out"), "--format", "gguf", "--dtype", "q8_0"])
    line = capsys.readouterr().out.strip()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["StoryMixtral-q8_0.gguf"]
    assert "llama.cpp llama, q8_0" in line and f"first {e.model.config.sliding_window} tokens" in line


@pytest.mark.parametrize("arch", ["SmolTransformer", "SmolMixtral"])
def test_architectures_llama_cpp_cannot_compute_are_refused_in_one_line(arch, tokenizers, tmp_path):
    model = tiny_model(arch, vocab_size=pad_vocab(len(tokenizers["bpe"])))
    ckpt = save_checkpoint(tmp_path / "ckpt", 1, model, tokenizers["bpe"], {"step": 1})
    with pytest.raises(UserError) as err:
        hub_main(["export", str(ckpt), str(tmp_path / "out"), "--format", "gguf"])
    message = str(err.value)
    assert "\n" not in message and f"computes {arch}" in message and "export it for transformers" in message
    assert not (tmp_path / "out").exists()


def test_bad_dtype_is_refused(exported, tmp_path):
    e = exported("StoryLlama", "bpe")
    with pytest.raises(UserError, match="--dtype: invalid choice: 'q4_0'"):
        hub_main(["export", str(e.checkpoint), str(tmp_path / "a"), "--format", "gguf", "--dtype", "q4_0"])
    with pytest.raises(UserError, match="use one of f32, f16, bf16, q8_0"):
        export_gguf(str(e.checkpoint), tmp_path / "b", "q4_0")
    with pytest.raises(UserError, match="--dtype sets the weight type of --format gguf"):
        hub_main(["export", str(e.checkpoint), str(tmp_path / "c"), "--dtype", "f16"])
    assert not any(tmp_path.iterdir())


def test_a_failed_export_leaves_nothing_behind(tokenizers, tmp_path):
    """A tokenizer llama.cpp's "gpt-2" pre-tokenizer would split differently fails the export midway:
    no output folder, no staging folder."""
    from tokenizers import pre_tokenizers

    tok = train_bpe([SHAKESPEARE.read_text()[:20_000]], 300)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    ckpt = save_checkpoint(tmp_path / "ckpt", 1, tiny_model("StoryLlama", vocab_size=320), tok, {"step": 1})
    with pytest.raises(UserError, match="not a GPT-2 style byte-level BPE"):
        export_gguf(str(ckpt), tmp_path / "out", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(UserError, match="already exists and is not empty"):
        export_gguf(str(ckpt), tmp_path / "ckpt", "f16")


def test_gguf_tensor_names_come_from_ggufs_tables(exported):
    import gguf

    e = exported("StoryKimi", "bpe")
    names = gguf.GGUFReader(str(e.gguf("f32").path)).tensors
    known = {re.sub(r"\.\d+\.", ".{bid}.", t.name).rsplit(".", 1)[0] for t in names}
    expected = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2]}
    assert known <= expected and "blk.{bid}.exp_probs_b" in known and "blk.{bid}.attn_k_b" in known


def test_agreement_benchmark_prints_its_table(capsys, one_thread):
    from benchmarks.gguf_agreement import main

    main(["--archs", "StoryLlama", "--tokenizers", "bpe", "--tokens", "24"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model | llama.cpp arch | tokenizer |") and len(table) == 3
    assert table[2].startswith("| StoryLlama | llama | bpe |") and table[2].endswith("| 16/16 |")


def test_a_checkpoint_that_drops_tokens_over_capacity_is_refused(tokenizers, tmp_path):
    model = tiny_model("StoryMixtral", vocab_size=pad_vocab(len(tokenizers["bpe"])), capacity_factor=1.25)
    ckpt = save_checkpoint(tmp_path / "ckpt", 1, model, tokenizers["bpe"], {"step": 1})
    with pytest.raises(UserError, match="which llama.cpp cannot reproduce; set \"capacity_factor\": 0"):
        export_gguf(str(ckpt), tmp_path / "out", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
