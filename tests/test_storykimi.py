"""StoryKimi: its layer layout, latent attention against a reference, its latent KV cache, DeepSeek-MoE
routing and balancing, QK-clip, and a tiny Muon training run with an exact resume. The contract all
five models share is in test_model_contract.py."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SHAKESPEARE, run_script, tiny_config, tiny_model
from smolhub.checkpoint import load_trainer_state
from smolhub.layers import RotaryEmbedding, SwiGLU, apply_rotary
from StoryKimi.attention import MLACache, MultiHeadLatentAttention
from StoryKimi.config import StoryKimiConfig
from StoryKimi.model import StoryKimi
from StoryKimi.moe import DeepSeekMoE, sequence_balance_loss

KIMI = REPO / "StoryKimi"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_layers_follow_models_md():
    with torch.device("meta"):
        model = StoryKimi(StoryKimiConfig(vocab_size=32000))
    assert isinstance(model.blocks[0].ffn, SwiGLU) and model.blocks[0].ffn.hidden == 2816
    assert len(model.moe_layers) == 11


def reference_mla(attn: MultiHeadLatentAttention, x: torch.Tensor, rope, head_max: list | None = None):
    """Decompress keys and values from the latent, then softmax(q k^T / sqrt(d)) v head by head.
    Appends each head's largest attention logit to head_max when given."""
    B, T, _ = x.shape
    nope, rdim, vdim = attn.nope_dim, attn.rope_dim, attn.v_dim
    if hasattr(attn, "wq_b"):
        q = attn.q_norm(x @ attn.wq_a.weight.T) @ attn.wq_b.weight.T
    else:
        q = x @ attn.wq.weight.T
    q = q.view(B, T, attn.n_head, nope + rdim)
    compressed = x @ attn.wkv_a.weight.T
    latent, k_rope = compressed[..., :attn.kv_lora_rank], compressed[..., attn.kv_lora_rank:]
    latent = attn.kv_norm(latent)  # RMSNorm (tested in test_layers.py)
    kv = (latent @ attn.wkv_b.weight.T).view(B, T, attn.n_head, nope + vdim)
    k_rope = apply_rotary(k_rope[:, None], *rope)[:, 0]  # (B, T, rope), one for all heads
    heads = []
    for h in range(attn.n_head):
        q_h = torch.cat([q[:, :, h, :nope], apply_rotary(q[:, None, :, h, nope:], *rope)[:, 0]], dim=-1)
        k_h = torch.cat([kv[:, :, h, :nope], k_rope], dim=-1)
        v_h = kv[:, :, h, nope:]
        scores = q_h @ k_h.transpose(-1, -2) / math.sqrt(nope + rdim)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        if head_max is not None:
            head_max.append(scores.max().item())
        heads.append(scores.softmax(-1) @ v_h)
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


@pytest.mark.parametrize("q_lora_rank", [0, 24], ids=["q-direct", "q-compressed"])
def test_mla_matches_reference_in_both_forms(q_lora_rank):
    torch.manual_seed(q_lora_rank)
    cfg = tiny_config("StoryKimi", q_lora_rank=q_lora_rank)
    attn = MultiHeadLatentAttention(cfg).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 13, cfg.n_embd, dtype=torch.float64)
    rope = tuple(t.double() for t in RotaryEmbedding(cfg.qk_rope_head_dim, 32)(0, 13))
    expected = reference_mla(attn, x, rope)
    torch.testing.assert_close(attn(x, rope), expected, rtol=1e-10, atol=1e-10)  # decompressed (training)
    cache = MLACache(2, 13, cfg.kv_lora_rank, cfg.qk_rope_head_dim, "cpu", torch.float64)
    torch.testing.assert_close(attn(x, rope, cache, 0), expected, rtol=1e-10, atol=1e-10)  # absorbed (cache)


def test_kv_cache_holds_only_the_latent_and_the_rotary_key():
    cfg = StoryKimiConfig(vocab_size=32000)
    with torch.device("meta"):
        model = StoryKimi(cfg)
    cache = model.make_kv_cache(3, 100, "meta", torch.bfloat16)
    assert len(cache) == cfg.n_layer
    per_token_per_layer = sum(t[0, 0].numel() for t in (cache[0].latent, cache[0].k_rope))
    assert per_token_per_layer == cfg.kv_lora_rank + cfg.qk_rope_head_dim == 144
    assert sum(c.latent.numel() + c.k_rope.numel() for c in cache) == 3 * 100 * cfg.n_layer * 144


def skewed_moe(seed: int = 0) -> DeepSeekMoE:
    """A router whose gate strongly prefers experts 0 and 1 for every input direction."""
    torch.manual_seed(seed)
    moe = DeepSeekMoE(tiny_config("StoryKimi", n_routed_experts=4, top_k=2))
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 0.01)
        moe.router.gate.weight[:2] += 0.3 * torch.ones(moe.router.gate.weight.size(1)) / 11
    return moe.train()


def test_balancing_bias_moves_toward_under_loaded_experts():
    moe = skewed_moe()
    x = torch.randn(4, 32, moe.router.gate.in_features).abs()  # positive inputs: experts 0 and 1 always win
    moe(x)
    moe(x)  # two micro-batches accumulate before the step
    load = moe.pending_load.clone()
    assert load.sum() == 2 * 4 * 32 * 2 and load[0] == load[1] == 256 and load[2:].sum() == 0
    moe.update_bias(load, rate=0.01)
    assert moe.router.balance_bias.tolist() == pytest.approx([-0.01, -0.01, 0.01, 0.01])
    assert moe.pending_load is None and not moe.router.balance_bias.requires_grad
    # repeated updates hand tokens to the idle experts until the load evens out (the sign rule then
    # oscillates around balance, so look at the average of the last steps)
    loads = []
    for _ in range(150):
        moe(x)
        moe.update_bias(moe.pending_load, rate=0.01)
        loads.append(moe.last_load)
    share = torch.stack(loads[-50:]).sum(0) / torch.stack(loads[-50:]).sum()
    assert share.min() > 0.15 and share.max() < 0.35, share  # from 0.5, 0.5, 0, 0


def test_bias_selects_but_never_weights():
    moe = skewed_moe()
    router = moe.router
    x = torch.randn(64, router.gate.in_features)
    router.balance_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # forces expert 2 into every top-2
    scores, idx, weights = router(x)
    assert (idx == 2).any(dim=-1).all()
    expected = scores.gather(-1, idx)
    torch.testing.assert_close(weights, expected / expected.sum(-1, keepdim=True), rtol=0, atol=0)
    # a change of the bias that keeps the selection keeps the weights and their gradient exactly
    g1 = torch.autograd.grad(weights.pow(2).sum(), router.gate.weight)[0]
    router.balance_bias.add_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    scores2, idx2, weights2 = router(x)
    assert torch.equal(idx2, idx) and torch.equal(weights2, weights)
    assert torch.equal(torch.autograd.grad(weights2.pow(2).sum(), router.gate.weight)[0], g1)
    assert router.balance_bias.grad is None and "balance_bias" in dict(router.named_buffers())


def test_sequence_balance_loss_matches_deepseek_v3_eq_17_to_20():
    torch.manual_seed(3)
    scores = torch.rand(2 * 5, 4)
    idx = scores.topk(2, dim=-1).indices
    loss = sequence_balance_loss(scores, idx, n_seq=2)
    expected = 0.0
    for s in range(2):
        sc, ix = scores[s * 5:(s + 1) * 5], idx[s * 5:(s + 1) * 5]
        for i in range(4):
            f_i = 4 / (2 * 5) * (ix == i).any(dim=-1).sum().item()
            p_i = (sc[:, i] / sc.sum(-1)).mean().item()
            expected += f_i * p_i / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    even = sequence_balance_loss(torch.ones(4, 4), torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), n_seq=1)
    assert even.item() == pytest.approx(1.0)


def test_training_hooks_log_load_and_survive_gradient_checkpointing():
    """Checkpointing recomputes each block in backward (recounting its tokens); the step's bias update,
    gradients and logged load must come out the same as without it."""
    torch.manual_seed(4)
    a = tiny_model("StoryKimi").train()
    b = tiny_model("StoryKimi", grad_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 320, (2, 33))
    for m in (a, b):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        (loss + m.aux_loss()).backward()
        m.after_optimizer_step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)
    assert torch.equal(a.moe_layers[0].router.balance_bias, b.moe_layers[0].router.balance_bias)
    assert a.moe_layers[0].router.balance_bias.abs().max() == pytest.approx(a.config.bias_update_rate)
    assert a.train_metrics() == b.train_metrics() and a.train_metrics()["expert_load_max"] >= 1.0


def test_qk_clip_caps_each_heads_max_logit_at_the_threshold():
    torch.manual_seed(5)
    cfg = tiny_config("StoryKimi", qk_clip_threshold=3.0)
    attn = MultiHeadLatentAttention(cfg).double().train()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
        attn.wq.weight.view(cfg.n_head, -1)[0] *= 0.01  # head 0 stays far below the threshold
    x = torch.randn(2, 17, cfg.n_embd, dtype=torch.float64)
    rope = tuple(t.double() for t in RotaryEmbedding(cfg.qk_rope_head_dim, 32)(0, 17))

    def head_max_logits():
        attn.max_logit = None
        attn(x, rope)
        return attn.max_logit.clone()

    before = head_max_logits()
    expected = []
    reference_mla(attn, x, rope, expected)
    assert before.tolist() == pytest.approx(expected, rel=1e-6)
    assert before[0] < 3.0 and (before[1:] > 3.0).all(), before
    k_rope_rows = attn.wkv_a.weight[attn.kv_lora_rank:].clone()
    attn.qk_clip(before, cfg.qk_clip_threshold)
    after = head_max_logits()
    torch.testing.assert_close(after[1:], torch.full_like(after[1:], 3.0), rtol=1e-6, atol=0)  # logits kept in fp32
    assert after[0] == before[0]
    assert torch.equal(attn.wkv_a.weight[attn.kv_lora_rank:], k_rope_rows)  # the shared rotary key is untouched


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same(a, b, where="state"):
    """Nested dicts/lists of tensors and numbers equal exactly."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_muon_training_lowers_val_loss_and_resumes_exactly(tmp_path):
    """trainer.py with Muon + AdamW, QK-clip (a threshold the tiny model's logits do cross) and the
    balancing bias: 30 steps straight, and the same run
    resumed from its step-15 checkpoint (as after a kill), must end bit-identical: losses, weights
    (balancing biases included) and both optimizers' states."""
    data = tmp_path / "data"
    args = ["trainer.py", "--preset", "tiny", "--dataset", str(SHAKESPEARE), "--data_dir", str(data),
            "--deterministic", "--sample_interval", "0", "--max_steps", "30", "--save_interval", "15",
            "--eval_interval", "15", "--eval_batches", "4", "--log_interval", "1", "--warmup_steps", "5",
            "--batch_size", "8", "--seq_len_stages", "64", "--tokens_per_step", "2048", "--qk_clip_threshold", "0.2"]
    straight = tmp_path / "straight"
    run_script([*args, "--out_dir", str(straight)], KIMI, tmp_path)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "ckpt-0000015", resumed / "ckpt-0000015")
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")
    run_script([*args, "--out_dir", str(resumed), "--resume"], KIMI, tmp_path)

    a, b = metrics(straight), metrics(resumed)
    val = [r["val_loss"] for r in a if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 1.0, val  # ~ln(512) = 6.2 at the start
    assert all("expert_load_max" in r for r in a if "loss" in r)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.get("loss") == rb.get("loss") and ra.get("val_loss") == rb.get("val_loss"), (ra, rb)
    wa = load_file(str(straight / "ckpt-0000030" / "model.safetensors"))
    wb = load_file(str(resumed / "ckpt-0000030" / "model.safetensors"))
    assert_same(wa, wb, "weights")
    bias = [k for k in wa if k.endswith("balance_bias")]
    mid = load_file(str(straight / "ckpt-0000015" / "model.safetensors"))
    assert bias and all(not torch.equal(wa[k], mid[k]) for k in bias)  # the biases kept moving after step 15
    sa = load_trainer_state(straight / "ckpt-0000030")["optimizer"]
    sb = load_trainer_state(resumed / "ckpt-0000030")["optimizer"]
    assert set(sa) == {"adamw", "muon"} and sa["muon"]["state"] and sa["adamw"]["state"]
    assert_same(sa, sb, "optimizer")
