"""benchmarks.precision (bf16 error per component against fp64, ours and the transformers twin) at toy
sizes, and what it found: with the residual stream in fp32 ours loses no more precision than the twin
anywhere, the bf16 residual stream is where it does, and the pairing the quality benchmark relies on
(weights, dropout) is the same on both sides."""
import argparse
import json

import pytest
import torch

from benchmarks import precision, quality
from benchmarks.common import load_ours_into_twin, pairs


@pytest.fixture(scope="module", params=["StoryLlama", "SmolTransformer"])
def measured(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("precision") / "precision.json"
    precision.main(["--model", request.param, "--device", "cpu", "--tiny", "--batch", "2", "--seq_len", "64",
                    "--json", str(out)])
    return request.param, json.loads(out.read_text())


def test_tables_cover_every_component_and_parameter(measured, capsys):
    name, res = measured
    forward, grads = res["whole"]["forward"], res["whole"]["gradients"]
    assert set(forward) == {"ours bf16 residual", "ours fp32 residual", "twin"}
    n_layer = precision.TINY["n_layer"]
    assert len(forward["twin"]) == 6 * n_layer + 3  # six points a block, the final residual, norm and loss
    ours = precision.build_ours(name, 512, True, None)
    assert set(grads["ours fp32 residual"]) == {n for n, _ in ours.named_parameters()}
    assert set(grads["twin"]) >= set(grads["ours fp32 residual"])  # every parameter of ours has the twin's
    assert res["whole"]["fp64 ours vs twin loss"] < 1e-9  # the same function: the two fp64 references agree


def test_fp32_residual_loses_no_more_than_the_twin(measured):
    """The pin: ours with the fp32 residual stream is as precise as the transformers twin, component by
    component (forward), and over the parameters' gradients on average; each isolated component as
    precise as the twin's formulation of it."""
    _, res = measured
    forward, grads = res["whole"]["forward"], res["whole"]["gradients"]
    for component, err in forward["ours fp32 residual"].items():
        if component != "loss":  # a difference of two numbers near 1e-5: compared with the gradients instead
            assert err <= 1.1 * forward["twin"][component] + 1e-6, component
    ours_mean = sum(grads["ours fp32 residual"].values()) / len(grads["ours fp32 residual"])
    twin_mean = sum(grads["twin"][p] for p in grads["ours fp32 residual"]) / len(grads["ours fp32 residual"])
    assert ours_mean <= 1.1 * twin_mean
    for component, (ours, twin) in res["isolated"].items():
        if not component.endswith(": loss"):
            assert ours <= 1.05 * twin + 1e-7, component


def test_bf16_residual_is_where_precision_goes(measured):
    """The tool sees the one component where ours is less precise than the twin: the bf16 residual stream."""
    _, res = measured
    forward, grads = res["whole"]["forward"], res["whole"]["gradients"]
    assert forward["ours bf16 residual"]["final norm"] > 1.5 * forward["ours fp32 residual"]["final norm"]
    assert sum(grads["ours bf16 residual"].values()) > 1.1 * sum(grads["ours fp32 residual"].values())


def test_norms_are_exact_in_float64():
    """A float64 model is an exact reference: its norms compute in fp64, not in fp32."""
    from smolhub.layers import LayerNorm, RMSNorm

    x = torch.randn(3, 5, 16, dtype=torch.float64) * 1e3 + 1.0
    rms = RMSNorm(16, 1e-5).double()
    exact = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert rms(x).dtype == torch.float64
    torch.testing.assert_close(rms(x), exact, rtol=1e-14, atol=0)
    ln = LayerNorm(16).double()
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(ln(x), centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["StoryLlama", "SmolTransformer"])
def test_same_init_gives_the_twin_our_weights(name):
    """quality --same_init: every weight of ours is in the twin, and maps back unchanged."""
    torch.manual_seed(0)
    ours, twin, _ = quality.build_pair(name, 512, argparse.Namespace(tiny=True))
    to_ours = load_ours_into_twin(name, ours, twin)
    back = to_ours(dict(twin.named_parameters()))
    for key, value in ours.state_dict().items():
        if key in back:
            torch.testing.assert_close(back[key], value, rtol=0, atol=0)
    assert {n for n, _ in ours.named_parameters()} <= set(back)


def test_gpt2_twin_trains_without_dropout():
    """GPT2Config's dropouts default to 0.1: the twin of SmolTransformer (dropout 0) must not have them,
    so two training-mode forwards of the same batch agree."""
    torch.manual_seed(0)
    ours, twin, _ = quality.build_pair("SmolTransformer", 512, argparse.Namespace(tiny=True))
    assert twin.config.n_inner == ours.config.ffn_hidden
    x = torch.randint(0, 512, (2, 32))
    twin.train()
    first, second = (twin(input_ids=x).logits for _ in range(2))
    assert torch.equal(first, second)
    assert pairs()["SmolTransformer"].baseline_name == "HF GPT2LMHeadModel"
