"""SmolMixtral and StoryMixtral: their default configs, sliding-window attention and its cache, MoE losses
in training. The contract all five models share is in test_model_contract.py."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHAKESPEARE, script_env, tiny_model, tiny_train_args
from smolhub.layers import (CausalSelfAttention, KVCache, NoisyTopKRouter, RotaryEmbedding, SlidingWindowKVCache,
                            SoftmaxTopKRouter, apply_rotary)
from smolhub.layers.attention import attend
from SmolMixtral.config import SmolMixtralConfig
from StoryMixtral.config import StoryMixtralConfig

MODELS = ("SmolMixtral", "StoryMixtral")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_configs_follow_models_md():
    smol, story = SmolMixtralConfig(), StoryMixtralConfig()
    assert (smol.n_embd, smol.n_layer, smol.n_head, smol.block_size, smol.rope_theta) == (512, 8, 8, 1024, 1e4)
    assert (smol.n_experts, smol.expert_hidden, smol.top_k, smol.noisy_routing) == (8, 1024, 2, True)
    assert (story.n_embd, story.n_layer, story.n_head, story.n_kv_heads) == (512, 14, 8, 2)
    assert (story.sliding_window, story.rope_theta, story.block_size) == (512, 1e6, 1024)
    assert story.router_z_loss_weight > 0 and story.capacity_factor == smol.capacity_factor == 0


# --- sliding-window attention -----------------------------------------------------------------

def reference_window_attention(x, attn: CausalSelfAttention, rope, window):
    """softmax(QK^T / sqrt(d) + band mask) V with the kv heads repeated: key s visible from t iff t-window < s <= t."""
    B, T, _ = x.shape
    H, KV, D = attn.n_head, attn.n_kv_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T).split([H * D, KV * D, KV * D], dim=-1)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill((s > t) | (s <= t - window), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D) @ attn.out.weight.T


def rope_for(pos, n, head_dim=8, max_len=64):
    return tuple(t.double() for t in RotaryEmbedding(head_dim, max_len)(pos, n))


@pytest.mark.parametrize("window", [1, 5, 30])
def test_windowed_attention_matches_reference(window):
    torch.manual_seed(window)
    attn = CausalSelfAttention(32, 4, 2, window=window).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    rope = rope_for(0, 23)
    torch.testing.assert_close(attn(x, rope), reference_window_attention(x, attn, rope, window), rtol=1e-10, atol=1e-10)


def test_tokens_outside_the_window_have_no_influence():
    """d out_t / d x_s is exactly zero for s <= t - window and non-zero inside the window."""
    torch.manual_seed(0)
    window, T = 4, 12
    attn = CausalSelfAttention(16, 2, window=window).double()
    x = torch.randn(1, T, 16, dtype=torch.float64, requires_grad=True)
    out = attn(x, rope_for(0, T, head_dim=8))
    for t in range(T):
        (grad,) = torch.autograd.grad(out[0, t].sum(), x, retain_graph=True)
        influence = grad[0].abs().sum(-1)
        assert torch.all(influence[:max(0, t - window + 1)] == 0), (t, influence)
        assert torch.all(influence[max(0, t - window + 1):t + 1] > 0), (t, influence)
        assert torch.all(influence[t + 1:] == 0)


@pytest.mark.parametrize("chunks", [[3] + [1] * 17, [7, 9, 1, 1, 2], [20]], ids=["tokens", "chunks", "one-prefill"])
def test_sliding_window_cache_equals_full_forward_beyond_the_window(chunks):
    """A 6-slot ring buffer decodes 20 positions exactly as the full windowed forward, chunks longer
    than the window included; RoPE positions stay absolute."""
    torch.manual_seed(1)
    window = 6
    attn = CausalSelfAttention(32, 4, 2, window=window).double().eval()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    full = attn(x, rope_for(0, 20))
    cache = SlidingWindowKVCache(2, 2, window, 8, "cpu", torch.float64)
    pieces, pos = [], 0
    for n in chunks:
        pieces.append(attn(x[:, pos:pos + n], rope_for(pos, n), cache, pos))
        pos += n
    assert cache.k.shape == (2, 2, window, 8)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)


def test_windowed_attention_with_a_full_cache_equals_full_forward():
    torch.manual_seed(2)
    attn = CausalSelfAttention(32, 4, 4, window=5).double().eval()
    x = torch.randn(1, 15, 32, dtype=torch.float64)
    full = attn(x, rope_for(0, 15))
    cache = KVCache(1, 4, 15, 8, "cpu", torch.float64)
    out = [attn(x[:, :9], rope_for(0, 9), cache, 0)] + [attn(x[:, t:t + 1], rope_for(t, 1), cache, t)
                                                        for t in range(9, 15)]
    torch.testing.assert_close(torch.cat(out, dim=1), full, rtol=1e-10, atol=1e-10)


def test_attend_window_none_is_plain_causal():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(attend(q, k, v, 0, window=9), attend(q, k, v, 0))


# --- the two models -----------------------------------------------------------------------------

def test_a_window_shorter_than_the_context_gets_ring_buffer_caches():
    model = tiny_model("StoryMixtral", sliding_window=8)
    assert all(isinstance(c, SlidingWindowKVCache) and c.window == 8
               for c in model.make_kv_cache(2, 30, "cpu", torch.float64))


@pytest.mark.parametrize("name", MODELS)
def test_aux_loss_and_metrics_come_from_the_training_forward(name):
    torch.manual_seed(2)
    model = tiny_model(name, aux_loss_weight=0.5, router_z_loss_weight=0.25)
    assert model.aux_loss() is None and model.train_metrics() == {}
    idx = torch.randint(0, 320, (2, 48))
    _, loss = model(idx, idx)
    aux = model.aux_loss()
    moes = [b.moe for b in model.blocks]
    expected = sum(0.5 * m.aux["balance"] + 0.25 * m.aux["z"] for m in moes) / len(moes)
    torch.testing.assert_close(aux, expected)
    (loss + aux).backward()
    assert all(m.router.gate.weight.grad.abs().sum() > 0 for m in moes)
    metrics = model.train_metrics()
    shares = [metrics[f"expert_share_{e}"] for e in range(8)]
    assert sum(shares) == pytest.approx(1.0) and 1.0 <= metrics["load_max_over_mean"] <= 4.0
    assert metrics["aux_loss"] == pytest.approx(sum(m.aux["balance"].item() for m in moes) / len(moes))
    model.eval()  # evaluation forwards leave the training metrics alone
    model(torch.randint(0, 320, (1, 8)))
    assert model.train_metrics() == metrics


def test_noisy_routing_only_in_training():
    torch.manual_seed(3)
    model = tiny_model("SmolMixtral")
    idx = torch.randint(0, 320, (2, 32))
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    assert all(type(b.moe.router) is NoisyTopKRouter for b in model.blocks)
    assert all(type(b.moe.router) is SoftmaxTopKRouter for b in tiny_model("SmolMixtral", noisy_routing=False).blocks)


@pytest.mark.parametrize("name", MODELS)
def test_expert_weights_get_the_residual_init(name):
    torch.manual_seed(7)
    model = tiny_model(name, n_layer=8)
    experts = model.blocks[0].moe.experts
    assert experts.gate_up.std().item() == pytest.approx(0.02, rel=0.05)
    assert experts.down.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2 * 8 layers)


def test_tiny_runs_learn_and_log_the_expert_load(tmp_path):
    """Both trainers, side by side on the two cores: 30 tiny steps of 8 x 64 tokens on Tiny Shakespeare."""
    procs = {}
    for name in MODELS:
        out = tmp_path / name
        args = tiny_train_args(out, tmp_path / f"data-{name}", "--max_steps", "30", "--eval_interval", "15",
                               "--log_interval", "10", "--batch_size", "8", "--block_size", "64",
                               "--warmup_steps", "5", "--eval_batches", "4", "--save_interval", "30",
                               "--max_tokens", "200000")
        procs[name] = (out, subprocess.Popen([sys.executable, *args], cwd=REPO / name, env=script_env(tmp_path / name),
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for name, (out, proc) in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        val = [r["val_loss"] for r in records if "val_loss" in r]
        assert val[0] > 5.5 and val[-1] < val[0] - 0.7, (name, val)
        train = [r for r in records if "loss" in r]
        assert len(train) == 3
        for r in train:
            shares = [r[f"expert_share_{e}"] for e in range(8)]
            assert sum(shares) == pytest.approx(1.0) and 1.0 <= r["load_max_over_mean"] <= 4.0  # 4 = E / k
            # E * sum f P is 1 under perfect balance and may dip just below when f and P disagree
            assert 0.9 < r["aux_loss"] < 1.5 and r["z_loss"] > 0, (name, r)
    # noisy gating spreads the tokens from the first step (collapse onto 2 of the 8 experts reads 4.0)
    smol = [r for r in (tmp_path / "SmolMixtral" / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    last = json.loads(smol[-1])
    assert last["load_max_over_mean"] < 2.5 and min(last[f"expert_share_{e}"] for e in range(8)) > 0.02, last


def test_balancing_loss_acts_on_a_collapsing_router():
    """StoryMixtral's noiseless router starts collapsed (the residual stream shares one direction at
    init). Without the Switch loss f and P collapse together and the loss climbs toward E/k = 4; with
    the default weight it is held near 1 (the load itself recovers over ~100 steps: see the README)."""
    data = torch.tensor(list(SHAKESPEARE.read_bytes()[:100000]))
    switch = {}
    for weight in (0.0, 0.01):
        torch.manual_seed(0)
        model = tiny_model("StoryMixtral", vocab_size=256, block_size=64, aux_loss_weight=weight)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
        g = torch.Generator().manual_seed(0)
        switch[weight] = []
        for _ in range(20):
            starts = torch.randint(0, len(data) - 65, (8,), generator=g)
            batch = torch.stack([data[i:i + 65] for i in starts])
            _, loss = model(batch[:, :-1], batch[:, 1:])
            (loss + model.aux_loss()).backward()
            optimizer.step()
            optimizer.zero_grad()
            switch[weight].append(model.train_metrics()["aux_loss"])
    assert switch[0.0][-1] > 2.5, switch[0.0]
    assert max(switch[0.01]) < 1.5, switch[0.01]
