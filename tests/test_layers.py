"""Each shared layer against a straightforward reference implementation."""
import math

import pytest
import torch
import torch.nn.functional as F

from smolhub.layers import (CausalSelfAttention, GeluMLP, KVCache, LayerNorm, LearnedPositionalEmbedding, RMSNorm,
                            RotaryEmbedding, SinusoidalPositionalEmbedding, SlidingWindowKVCache, SwiGLU, apply_rotary)
from smolhub.layers.positions import rotary_qkv


def reference_attention(x, attn: CausalSelfAttention, rope=None):
    """softmax(QK^T / sqrt(d) + causal mask) V with the kv heads explicitly repeated."""
    B, T, _ = x.shape
    H, KV, D = attn.n_head, attn.n_kv_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T
    q, k, v = qkv[..., :H * D], qkv[..., H * D:(H + KV) * D], qkv[..., (H + KV) * D:]
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, KV, D).transpose(1, 2)
    v = v.view(B, T, KV, D).transpose(1, 2)
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k = k.repeat_interleave(H // KV, dim=1)
    v = v.repeat_interleave(H // KV, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, H * D) @ attn.out.weight.T


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_attention_matches_reference(n_kv_heads):
    torch.manual_seed(n_kv_heads)
    attn = CausalSelfAttention(64, 8, n_kv_heads).double()
    x = torch.randn(3, 11, 64, dtype=torch.float64)
    rope = tuple(t.double() for t in RotaryEmbedding(8, 32)(0, 11))
    torch.testing.assert_close(attn(x, rope), reference_attention(x, attn, rope), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn(x), reference_attention(x, attn), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tensor_positions", [False, True], ids=["int-pos", "tensor-pos"])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_attention_kv_cache_equals_full_forward(n_kv_heads, tensor_positions):
    """Tensor positions (CUDA-graph decoding) attend over the whole masked buffer, single tokens
    through one_query_attention; int positions over the filled part, through SDPA."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, n_kv_heads).double().eval()
    rope_table = RotaryEmbedding(8, 64)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    full = attn(x, tuple(t.double() for t in rope_table(0, 20)))
    cache = KVCache(2, n_kv_heads, 64, 8, "cpu", torch.float64)
    # a 7-token prefill, one 5-token chunk (needs the explicit mask), then single tokens
    pieces, pos = [], 0
    for n in [7, 5] + [1] * 8:
        start = torch.tensor(pos) if tensor_positions and n == 1 else pos
        rope = tuple(t.double() for t in rope_table(start, n))
        pieces.append(attn(x[:, pos:pos + n], rope, cache, start))
        pos += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cache_kind", ["full", "window", "latent"])
def test_caches_store_in_their_dtype_whatever_the_autocast(cache_kind):
    """Under autocast new keys/values arrive in bf16 while the cache keeps the weights' dtype: the
    tensor-position path (CUDA-graph decoding) must store them converted, as the int-position path
    does, instead of failing (as the trainer's periodic sample on a GPU would)."""
    from StoryKimi.attention import MLACache

    torch.manual_seed(0)
    new = [torch.randn(2, 3, 1, 8).bfloat16(), torch.randn(2, 3, 1, 8).bfloat16()]
    if cache_kind == "latent":
        cache_class, shape = MLACache, (2, 16, 8, 8)  # batch, positions, latent width, rope width
        new = [t.view(2, 3, 8)[:, :1] for t in new]
    else:
        cache_class = KVCache if cache_kind == "full" else SlidingWindowKVCache
        shape = (2, 3, 16, 8)  # batch, kv heads, positions (the window), head size
    by_tensor, by_int = cache_class(*shape, "cpu", torch.float32), cache_class(*shape, "cpu", torch.float32)
    stored_by_tensor = by_tensor.update(*new, torch.tensor(5))
    stored_by_int = by_int.update(*new, 5)
    for a, b, written in zip(stored_by_tensor, stored_by_int, new):
        assert a.dtype == b.dtype == torch.float32
        assert (a == 0).sum() == a.numel() - written.numel()
        torch.testing.assert_close(a[a != 0], written.float().flatten()[written.flatten() != 0])
        torch.testing.assert_close(b[b != 0], written.float().flatten()[written.flatten() != 0])


def test_attention_rejects_bad_head_split():
    with pytest.raises(ValueError, match="divisible"):
        CausalSelfAttention(64, 8, 3)


def test_rope_matches_complex_formulation():
    """Rotate-half RoPE == multiplying (x_i + i x_{i+d/2}) by e^{i m theta_i}."""
    torch.manual_seed(0)
    D, T, theta = 16, 10, 10000.0
    x = torch.randn(2, 3, T, D, dtype=torch.float64)
    cos, sin = RotaryEmbedding(D, T, theta)(0, T)
    ours = apply_rotary(x, cos.double(), sin.double())
    freqs = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(angles), angles)
    ref = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)  # the tables are stored in fp32


def test_rope_offset_and_relative_property():
    """Scores depend only on relative position: q_m . k_n == q_{m+s} . k_{n+s}."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, 64)
    q, k = torch.randn(8), torch.randn(8)

    def rot(v, pos):
        cos, sin = rope(pos, 1)
        return apply_rotary(v.view(1, 1, 1, 8), cos, sin).view(8)

    assert torch.allclose(rot(q, 3) @ rot(k, 1), rot(q, 30) @ rot(k, 28), atol=1e-5)


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (6, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_rotary_qkv_equals_split_and_apply_rotary_with_gradients(n_head, n_kv):
    """The fused op (one Triton kernel each way on CUDA; torch here) against the plain split + rotate."""
    torch.manual_seed(0)
    B, T, D = 2, 9, 8
    qkv = torch.randn(B, T, (n_head + 2 * n_kv) * D, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in RotaryEmbedding(D, 32)(5, T))

    def plain(qkv):
        q, k, v = qkv.split([n_head * D, n_kv * D, n_kv * D], dim=-1)
        q, k = (apply_rotary(t.view(B, T, -1, D), cos[:, None], sin[:, None]) for t in (q, k))
        return q, k, v.view(B, T, n_kv, D)

    fused = rotary_qkv(qkv, cos, sin, n_head, n_kv)
    grads = [torch.randn_like(t) for t in fused]
    for a, b in zip(fused, plain(qkv)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(fused, qkv, grads)
    torch.testing.assert_close(grad, torch.autograd.grad(plain(qkv), qkv, grads)[0], rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: rotary_qkv(x, cos, sin, n_head, n_kv), (qkv,))
    compiled = torch.compile(rotary_qkv, fullgraph=True, backend="aot_eager")(qkv, cos, sin, n_head, n_kv)
    torch.testing.assert_close(torch.autograd.grad(compiled, qkv, grads)[0], grad, rtol=1e-12, atol=1e-12)


def test_rmsnorm_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.data = torch.randn(16)
    x = torch.randn(4, 16)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref)


def test_rmsnorm_computes_in_fp32_under_bf16():
    x = (torch.randn(4, 64) * 100).bfloat16()
    norm = RMSNorm(64)
    ref = (x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert norm(x).dtype == torch.bfloat16
    torch.testing.assert_close(norm(x).float(), ref.float(), rtol=0, atol=0)


def test_layernorm_formula():
    torch.manual_seed(0)
    norm = LayerNorm(16, eps=1e-5)
    norm.weight.data = torch.randn(16)
    norm.bias.data = torch.randn(16)
    x = torch.randn(4, 16)
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), ref + norm.bias)


def test_swiglu_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(16, 24)
    x = torch.randn(3, 16)
    gate_w, up_w = ffn.gate_up.weight[:24], ffn.gate_up.weight[24:]
    ref = (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ ffn.down.weight.T
    torch.testing.assert_close(ffn(x), ref)


def test_gelu_mlp_formula():
    torch.manual_seed(0)
    mlp = GeluMLP(16, 64)
    assert mlp.up.bias is None and mlp.down.bias is None
    x = torch.randn(3, 16)
    h = x @ mlp.up.weight.T
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    torch.testing.assert_close(mlp(x), h @ mlp.down.weight.T)


def test_sinusoidal_positions_formula():
    table = SinusoidalPositionalEmbedding(50, 8)(0, 50)
    pos, i = 7, 2
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-6)
    torch.testing.assert_close(SinusoidalPositionalEmbedding(50, 8)(5, 3), table[5:8])
    torch.testing.assert_close(SinusoidalPositionalEmbedding(50, 8)(torch.tensor(5), 3), table[5:8])  # decoding


def test_learned_positions_refuse_beyond_context():
    emb = LearnedPositionalEmbedding(16, 8)
    assert emb(10, 6).shape == (6, 8)
    with pytest.raises(ValueError, match="beyond the 16 learned positions"):
        emb(10, 7)


def test_rotary_triton_kernel_equals_the_torch_rotation_in_the_interpreter(interpreted_triton):
    """smolhub.kernels.rotary (the CUDA path of rotary_qkv) under triton's interpreter, both ways."""
    from smolhub.kernels.rotary import rotary_qkv as kernel_rotary_qkv
    from smolhub.kernels.rotary import rotary_qkv_backward
    from smolhub.layers.positions import _rotate_halves

    B, T, H, KV, D = 2, 8, 4, 2, 16
    cos, sin = RotaryEmbedding(D, T)(0, T)
    qkv = torch.randn(B, T, (H + 2 * KV) * D, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv.view(B, T, H + 2 * KV, D).split([H, KV, KV], dim=2)
    got = kernel_rotary_qkv(qkv, cos, sin, H, KV)
    for a, b in zip(got, (_rotate_halves(q, cos, sin, False), _rotate_halves(k, cos, sin, False), v)):
        torch.testing.assert_close(a, b)
    grads = [torch.randn_like(t) for t in got]
    expected = torch.cat([_rotate_halves(grads[0], cos, sin, True), _rotate_halves(grads[1], cos, sin, True),
                          grads[2]], dim=2).flatten(2)
    torch.testing.assert_close(rotary_qkv_backward(*grads, cos, sin), expected)
