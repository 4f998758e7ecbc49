"""Quantized inference (smolhub.quantize through torchao) on CPU, every model and every mode: weights
memory read from storage against what each format stores, logits against the fp32 model's, greedy
generation, the experts quantized, the tied embedding stored once, load_model and inference.py
--quantize on a saved checkpoint, the one-line refusal of a setting that cannot run, and the
benchmark's JSON.

The models are the tiny presets trained for a few dozen steps to continue a repeating 24-token
pattern: at init every logit is near-uniform and any top-1 comparison is noise, while a trained model's
confident predictions are what quantization must keep."""
import itertools
import json
import runpy
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from conftest import REPO, SHAKESPEARE, tiny_model
from smolhub.errors import UserError
from smolhub.generate import Engine, SamplingConfig
from smolhub.layers import GroupedExperts
from smolhub.modeling import ARCHITECTURES
from smolhub.quantize import (NOT_QUANTIZED, QuantizedEmbedding, QuantizedExperts, _config, _probe, _torchao,
                              check_quantize, quantize_model, weights_bytes)

MODES = ("int8", "int8-dynamic", "int4")
PATTERN = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(0))
TEXT = PATTERN.repeat(12)
# Relative error of the logits (norm of the difference over the norm): torchao on one Linear of random
# weights gives 0.4% (int8), 0.8% (int8 activations too) and 7% (int4, groups of 128); two blocks
# and a head compound that, and a trained model's weights are less even than a Gaussian's
MAX_LOGIT_ERROR = {"int8": 0.015, "int8-dynamic": 0.04, "int4": 0.10}
_trained: dict[str, dict] = {}


def trained_state(name: str) -> dict:
    """The weights of the tiny preset after 50 AdamW steps on TEXT (its loss then ~0.05), shared by
    the module's tests."""
    if name not in _trained:
        torch.manual_seed(0)
        model = tiny_model(name)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(50):
            x = torch.stack([TEXT[s:s + 97] for s in torch.randint(0, 24, (4,), generator=g)])
            _, loss = model(x[:, :-1], x[:, 1:])
            aux = model.aux_loss()
            (loss if aux is None else loss + aux).backward()
            opt.step()
            opt.zero_grad()
        _trained[name] = model.state_dict()
    return _trained[name]


def trained(name: str, **overrides) -> nn.Module:
    model = tiny_model(name, **overrides)
    model.load_state_dict(trained_state(name))
    return model.eval()


def quantized_bytes(out: int, inp: int, mode: str) -> int:
    """One (out, inp) matrix as torchao stores it on CPU: int8 values with an fp32 scale and an int8
    zero point per output row; int4 two values a byte with an fp32 scale and zero point per group of
    inputs, for output widths in 16s (other widths stay fp32)."""
    if mode != "int4":
        return out * inp + 5 * out
    group = next((g for g in (128, 64, 32) if inp % g == 0), None)
    return 4 * out * inp if group is None or out % 16 else out * inp // 2 + 8 * out * inp // group


def expected_bytes(model: nn.Module, mode: str) -> int:
    """What the quantized model must store, from the fp32 model's shapes: every parameter in fp32 but
    the quantized matrices, each expert matrix as a Linear, the head in int8 and the tied embedding
    not again."""
    total = 4 * sum(p.numel() for p in model.parameters())
    for name, m in model.named_modules():
        if isinstance(m, GroupedExperts):
            total -= 4 * (m.gate_up.numel() + m.down.numel())
            total += m.n_experts * (quantized_bytes(2 * m.hidden, m.dim, mode) + quantized_bytes(m.dim, m.hidden, mode))
        elif isinstance(m, nn.Linear) and not name.endswith(NOT_QUANTIZED):
            head = m is model.lm_head
            total += quantized_bytes(m.out_features, m.in_features, "int8" if head else mode) - 4 * m.weight.numel()
    return total


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_quantized_model_is_smaller_agrees_and_generates(name, mode, one_thread):
    reference = trained(name)
    model = quantize_model(trained(name), mode)
    assert weights_bytes(model) == expected_bytes(reference, mode)
    assert weights_bytes(model) < (0.3 if mode != "int4" else 0.2) * weights_bytes(reference)
    x = TEXT[None, 3:103]
    with torch.no_grad():
        want, got = reference(x)[0], model(x)[0]
    assert (got - want).norm() / want.norm() < MAX_LOGIT_ERROR[mode]
    top2 = want.topk(2, dim=-1).values
    confident = top2[..., 0] - top2[..., 1] > 1.0  # the fp32 model's top token leads by over a nat
    assert confident.sum() >= 15
    assert torch.equal(got.argmax(-1)[confident], want.argmax(-1)[confident])
    greedy = SamplingConfig(max_new_tokens=24, temperature=0)
    expected = torch.stack(list(Engine(reference).generate_ids(TEXT[None, :40], greedy)), 1)
    tokens = torch.stack(list(Engine(model).generate_ids(TEXT[None, :40], greedy)), 1)
    assert (tokens == expected).float().mean() >= 0.75


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["SmolMixtral", "StoryKimi"])
def test_every_matrix_but_routers_and_absorbed_attention_is_quantized(name, mode):
    model = quantize_model(trained(name), mode)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]  # no stacked expert weights left
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert len(experts) == sum(isinstance(m, GroupedExperts) for m in tiny_model(name).modules()) > 0
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            quantized = is_traceable_wrapper_subclass(m.weight)
            cpu_int4_packs = mode != "int4" or m.out_features % 16 == 0 or m is model.lm_head
            assert quantized == (not n.endswith(NOT_QUANTIZED) and cpu_int4_packs), n


@pytest.mark.parametrize("mode", MODES)
def test_experts_run_torchaos_linear_on_both_paths(mode, one_thread):
    """Each expert matrix gives what torchao gives on a plain nn.Linear of that expert's weight, and
    the layer mixes them as GroupedExperts does, on the decode path (every expert, few tokens) and
    on the prefill path (each expert on its own rows)."""
    torch.manual_seed(0)
    grouped = GroupedExperts(4, 64, 32).eval()
    experts = QuantizedExperts(grouped)
    _torchao().quantize_(experts, _config(mode, torch.device("cpu"), 32))
    for e in range(4):
        plain = nn.Linear(64, 64, bias=False)
        plain.weight = nn.Parameter(grouped.gate_up[e].detach().t().contiguous())
        _torchao().quantize_(plain, _config(mode, torch.device("cpu"), 32))
        x = torch.randn(5, 64)
        assert torch.equal(experts.gate_up[e](x), plain(x))
    weight_only = mode != "int8-dynamic"
    if weight_only:  # the same function as GroupedExperts on the matrices the kernels apply (to the identity)
        with torch.no_grad():
            grouped.gate_up.copy_(torch.stack([m(torch.eye(64)) for m in experts.gate_up]))
            grouped.down.copy_(torch.stack([m(torch.eye(32)) for m in experts.down]))
    for n in (10, 100):
        x = torch.randn(n, 64)
        idx = torch.rand(n, 4).argsort(dim=-1)[:, :2]
        w = torch.rand(n, 2).softmax(dim=-1)
        with torch.no_grad():
            got, want = experts(x, idx, w), grouped._loop(x, idx, w)
        assert (got - want).norm() / want.norm() < (1e-5 if weight_only else MAX_LOGIT_ERROR[mode])


@pytest.mark.parametrize("mode", MODES)
def test_tied_embedding_is_the_int8_head_stored_once(mode):
    model = quantize_model(trained("StoryLlama"), mode)
    head = model.lm_head.weight
    assert isinstance(model.tok_emb, QuantizedEmbedding) and model.tok_emb.weight is head
    assert type(head).__name__ == "Int8Tensor" and head.qdata.dtype == torch.int8  # int8 even for int4
    idx = torch.tensor([[0, 5, 319, 5]])
    assert torch.equal(model.tok_emb(idx), head.dequantize()[idx])
    untied = quantize_model(trained("StoryLlama", tie_embeddings=False), mode)
    assert untied.tok_emb.weight is not untied.lm_head.weight
    assert torch.equal(untied.tok_emb(idx), untied.tok_emb.weight.dequantize()[idx])
    assert weights_bytes(untied) == weights_bytes(model) + 320 * (128 + 5)  # the table, int8, once more


def test_a_setting_that_cannot_run_is_one_line_before_the_model_changes(monkeypatch):
    with pytest.raises(UserError, match=r"^--quantize int4 on CUDA runs tinygemm, which takes bfloat16.*"
                                        r"--dtype bfloat16"):
        check_quantize("int4", torch.device("cuda"), torch.float32)
    with pytest.raises(UserError, match=r"^--quantize int8-dynamic is for CPUs.*use --quantize int8 or int4$"):
        check_quantize("int8-dynamic", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(UserError, match="choose one of none, int8, int8-dynamic, int4"):
        check_quantize("int3", torch.device("cpu"), torch.float32)
    model = tiny_model("StoryMixtral").to("meta")
    with pytest.raises(UserError, match="runs on CPU and CUDA, not meta"):
        quantize_model(model, "int8")
    assert isinstance(model.tok_emb, nn.Embedding) and any(isinstance(m, GroupedExperts) for m in model.modules())
    # a kernel that does not load (torchao's default int4 format without mslk) names the one that runs
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

    def missing(*args, **kwargs):
        raise ImportError("Requires mslk >= 1.0.0")
    monkeypatch.setattr(Int4OpaqueTensor, "from_hp", classmethod(missing))
    _probe.cache_clear()
    try:
        with pytest.raises(UserError) as e:
            check_quantize("int4", torch.device("cpu"), torch.float32)
    finally:
        _probe.cache_clear()
    assert str(e.value) == ("--quantize int4 does not run on cpu in torch.float32 here (ImportError: Requires "
                            "mslk >= 1.0.0): --quantize int8 does")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny trained StoryMixtral checkpoint with a 320-token BPE."""
    from smolhub.checkpoint import save_checkpoint
    from smolhub.tokenizer import train_bpe

    with open(SHAKESPEARE, encoding="utf-8") as f:
        tokenizer = train_bpe(list(itertools.islice(f, 400)), 320)
    root = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(root / "StoryMixtral", 1, trained("StoryMixtral"), tokenizer, {"step": 1})
    return root / "StoryMixtral"  # a run's out_dir: load_model takes its newest checkpoint


def test_load_model_quantizes_a_checkpoint(checkpoint):
    from smolhub.inference import generate_text, load_model

    plain = load_model(str(checkpoint), "cpu")
    engine = load_model(str(checkpoint), "cpu", quantize="int8")
    assert weights_bytes(engine.model) < 0.3 * weights_bytes(plain.model)
    assert any(isinstance(m, QuantizedExperts) for m in engine.model.modules())
    prompt = "First Citizen:"
    assert generate_text(engine, prompt, max_length=12, temperature=0).startswith(prompt)
    with pytest.raises(UserError, match="choose one of"):
        load_model(str(checkpoint), "cpu", quantize="int2")


def test_inference_cli_runs_quantized(checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(REPO / "StoryMixtral")
    monkeypatch.setattr(sys, "argv", ["inference.py", "--checkpoint", str(checkpoint), "--quantize", "int8",
                                      "--max_new_tokens", "8", "--seed", "0", "--json"])
    runpy.run_path("inference.py", run_name="__main__")
    record = json.loads(capsys.readouterr().out)
    assert record["prompt"] == "Once upon a time" and 0 < record["tokens"] <= 8


def test_benchmark_writes_every_setting(checkpoint, tmp_path, capsys):
    from benchmarks.quantize import main

    text = tmp_path / "held_out.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    out = tmp_path / "q.json"
    main(["--checkpoints", str(checkpoint), "--device", "cpu", "--settings", "none", "int8", "--text", str(text),
          "--data_dir", str(tmp_path / "data"), "--eval_tokens", "256", "--batches", "1", "4", "--new_tokens", "4",
          "--prompt_len", "8", "--repeats", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["peak_decode_memory"].startswith("process VmHWM")
    none, int8 = record["rows"]
    for row in (none, int8):
        assert row["model"] == checkpoint.name
        assert row["peak_decode_mib"] > row["weights_mib"] > 0
        assert row["tok_per_s_b1"] > 0 and row["tok_per_s_b4"] > 0 and row["eval_tokens"] == 256
    assert int8["weights_mib"] < 0.3 * none["weights_mib"]
    assert abs(int8["bpb_change"]) < 0.05 and int8["bpb_change"] == int8["bpb"] - none["bpb"]
    assert "| int8 |" in capsys.readouterr().out
