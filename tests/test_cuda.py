"""The GPU-only code paths, on a CUDA GPU: grouped-GEMM experts, the MoE layer and models under
torch.compile, FlexAttention's sliding window, the Triton RoPE and loss kernels, the CUDA-graph
decoders, and every model's trainer with CUDA graphs on and off.

Marked `cuda`: skipped without a GPU; on one, `python -m pytest -m cuda` runs them all (a few
minutes on an H100). Sizes are small: these check results; `benchmarks.layer_speed` times them.
They need torch, triton and transformers only. One CPU test keeps the trainer run they share from
rotting.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import SHAKESPEARE, run_tiny_trainer, tiny_model
from smolhub.modeling import ARCHITECTURES

cuda = pytest.mark.cuda


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# --- mixture of experts -------------------------------------------------------------------------

FAST_EXPERTS = ["grouped_mm", "triton"]  # the GPU paths of GroupedExperts, each held to the "loop" reference


def moe_layer(kernel: str, noisy: bool = False):
    """The MoE layer at StoryMixtral's width: d=512, 8 experts of 1024, top-2, in training mode."""
    from smolhub.layers import GroupedExperts, MoEFeedForward, NoisyTopKRouter, SoftmaxTopKRouter

    torch.manual_seed(0)
    router = (NoisyTopKRouter if noisy else SoftmaxTopKRouter)(512, 8, 2)
    return MoEFeedForward(router, GroupedExperts(8, 512, 1024, kernel=kernel)).cuda().train()


def moe_loss(layer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
        return (y.float() * g).sum() + layer.aux["balance"] + layer.aux["z"]


def moe_inputs(tokens: int = 16384):
    gen = torch.Generator(device="cuda").manual_seed(0)
    return (torch.randn(tokens, 512, device="cuda", generator=gen, requires_grad=True),
            torch.randn(tokens, 512, device="cuda", generator=gen))


@cuda
def test_auto_experts_kernel_is_the_fastest_path_this_gpu_runs():
    """auto: the grouped GEMM in bf16 on an H100-class GPU, the Triton kernels in bf16 on older ones
    (where grouped_mm does not run), the exact loop in fp32."""
    from smolhub.layers.moe import auto_experts_kernel

    x = torch.zeros(1, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert auto_experts_kernel(x) == ("grouped_mm" if torch.cuda.get_device_capability() >= (9, 0) else "triton")
    assert auto_experts_kernel(x) == "loop"


@cuda
@pytest.mark.parametrize("kernel", FAST_EXPERTS)
def test_grouped_experts_equal_the_per_expert_loop(kernel):
    """The grouped GEMM (chosen under bf16 autocast on sm90) and the Triton kernels against the loop,
    forward and every gradient, in bf16 autocast over fp32 weights (the training setting)."""
    from smolhub.layers.moe import grouped_mm_supported

    if torch.cuda.get_device_capability() >= (9, 0):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert grouped_mm_supported(torch.zeros(1, device="cuda"))
    x, g = moe_inputs()
    results = []
    for layer_kernel in (kernel, "loop"):
        layer = moe_layer(layer_kernel)
        xi = x.detach().clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xi)
        moe_loss(layer, xi, g).backward()
        results.append([y, xi.grad] + [p.grad for p in layer.parameters()])
    errors = [rel_err(a, b) for a, b in zip(*results)]
    assert len(errors) == 5 and max(errors) < 2e-2, errors  # output, x, router gate, gate_up, down


@cuda
@pytest.mark.parametrize("kernel", FAST_EXPERTS)
@pytest.mark.parametrize("used", [[1, 4, 6], [2, 5]], ids=["idle-experts", "every-token-same-experts"])
def test_grouped_experts_equal_the_loop_on_skewed_routing(used, kernel):
    """Routing the router would rarely produce: three experts get every token (five get none), or every
    token picks the same two. Grouped GEMM and Triton kernels against the loop under bf16 autocast,
    output and gradients; the idle experts' weight gradients are exactly zero."""
    from test_moe import routing

    from smolhub.layers import GroupedExperts

    tokens = 4096
    idx, w = (t.cuda() for t in routing(tokens, 8, 2, used, seed=len(used)))
    gen = torch.Generator(device="cuda").manual_seed(len(used))
    x = torch.randn(tokens, 512, device="cuda", generator=gen)
    g = torch.randn(tokens, 512, device="cuda", generator=gen)
    results = []
    for experts_kernel in (kernel, "loop"):
        torch.manual_seed(0)
        experts = GroupedExperts(8, 512, 1024, kernel=experts_kernel).cuda()
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = experts(xi, idx, wi)
        (y.float() * g).sum().backward()
        results.append([y, xi.grad, wi.grad, experts.gate_up.grad, experts.down.grad])
    errors = [rel_err(a, b) for a, b in zip(*results)]
    assert max(errors) < 2e-2, errors
    idle = [e for e in range(8) if e not in used]
    for grad in results[0][3:]:
        assert grad[idle].abs().sum() == 0 and grad[used].abs().sum() > 0


@cuda
@pytest.mark.parametrize("kernel", FAST_EXPERTS)
@pytest.mark.parametrize("noisy", [False, True], ids=["softmax-router", "noisy-router"])
def test_moe_layer_compiles_as_one_graph(noisy, kernel):
    """Router, balancing losses and grouped experts compile with fullgraph=True, forward and backward,
    and the compiled gradients equal eager ones (noise aside) to bf16 rounding."""
    x, g = moe_inputs()
    layer = moe_layer(kernel, noisy=noisy)
    torch._dynamo.reset()
    compiled = torch.compile(lambda inp: moe_loss(layer, inp, g), fullgraph=True)
    compiled(x).backward()
    if not noisy:
        compiled_grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        x.grad = None
        layer.zero_grad(set_to_none=True)
        moe_loss(layer, x, g).backward()
        errors = [rel_err(a, b) for a, b in zip(compiled_grads, [x.grad] + [p.grad for p in layer.parameters()])]
        assert max(errors) < 2e-2, errors


@cuda
@pytest.mark.parametrize("kernel", FAST_EXPERTS)
@pytest.mark.parametrize("name", ["SmolMixtral", "StoryMixtral"])
def test_moe_model_training_step_has_no_graph_break(name, kernel):
    model = tiny_model(name, vocab_size=32000, experts_kernel=kernel).cuda().train()
    idx = torch.randint(0, 32000, (8, 128), device="cuda")

    def loss_of(i):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(i, i)
            return loss + model.aux_loss()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss_of)(idx)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    torch._dynamo.reset()
    loss = torch.compile(loss_of, fullgraph=True)(idx)
    loss.backward()
    assert torch.isfinite(loss) and 1.0 <= model.train_metrics()["load_max_over_mean"] <= 4.0  # 4 = E / k


# --- attention and kernels ----------------------------------------------------------------------

@cuda
def test_flex_sliding_window_equals_masked_sdpa():
    """FlexAttention (the CUDA training path of a sliding window) against SDPA with a boolean mask,
    forward and the input's gradient, GQA 8 query / 2 key-value heads in bf16 autocast."""
    from smolhub.layers import CausalSelfAttention
    from smolhub.layers.attention import attend

    torch.manual_seed(0)
    B, T, window = 4, 1024, 256
    attn = CausalSelfAttention(512, 8, 2, window=window).cuda()
    x = torch.randn(B, T, 512, device="cuda")
    g = torch.randn(B, 8, T, 64, device="cuda")

    def run(key_pos):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q, k, v = attn.qkv(xi).split([512, 128, 128], dim=-1)
            q, k, v = (t.view(B, T, -1, 64).transpose(1, 2) for t in (q, k, v))
            y = attend(q, k, v, 0, window=window, key_pos=key_pos)  # key positions force the mask
        (y.float() * g).sum().backward()
        return y, xi.grad

    flex, masked = run(None), run(torch.arange(T, device="cuda"))
    assert rel_err(flex[0], masked[0]) < 1e-2 and rel_err(flex[1], masked[1]) < 1e-2


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_kernel_equals_its_torch_path(dtype):
    """smolhub.kernels.rotary on the fused q/k/v projection against the torch rotation, both ways."""
    from smolhub.kernels.rotary import rotary_qkv, rotary_qkv_backward
    from smolhub.layers import RotaryEmbedding
    from smolhub.layers.positions import _rotate_halves

    B, T, H, KV, D = 8, 512, 12, 4, 64
    tol = 1e-6 if dtype == torch.float32 else 1e-4
    cos, sin = RotaryEmbedding(D, T).cuda()(0, T)
    qkv = torch.randn(B, T, (H + 2 * KV) * D, device="cuda", dtype=dtype)
    q, k, v = qkv.view(B, T, H + 2 * KV, D).split([H, KV, KV], dim=2)
    got = rotary_qkv(qkv, cos, sin, H, KV)
    expected = (_rotate_halves(q, cos, sin, False), _rotate_halves(k, cos, sin, False), v)
    assert [rel_err(a, b) < tol for a, b in zip(got, expected)] == [True] * 3
    grads = [torch.randn_like(t) for t in got]
    expected = torch.cat([_rotate_halves(grads[0], cos, sin, True), _rotate_halves(grads[1], cos, sin, True),
                          grads[2]], dim=2).flatten(2)
    assert rel_err(rotary_qkv_backward(*grads, cos, sin), expected) < tol


@cuda
def test_loss_kernel_equals_its_torch_path_on_every_row():
    """The worst row over five runs: a row whose target logit were read after another thread
    overwrote it with its gradient shows as one wrong loss, which an error over all rows would hide."""
    from smolhub.kernels.cross_entropy import cross_entropy_rows_
    from smolhub.loss import CHUNK_ELEMENTS, _cross_entropy_rows_torch

    N, V = 16384, 50304
    logits = torch.randn(N, V, device="cuda").mul_(3).bfloat16()
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::97] = -100
    theirs = logits.clone()
    loss_theirs = _cross_entropy_rows_torch(theirs, targets, -100, True, CHUNK_ELEMENTS)
    for _ in range(5):
        ours = logits.clone()
        loss_ours = cross_entropy_rows_(ours, targets, -100, True)
        assert (loss_ours - loss_theirs).abs().max().item() < 1e-4
        assert (ours.float() - theirs.float()).abs().max().item() < 3.9e-3  # a bf16 ulp at 1
    assert (ours[::97] == 0).all() and ours.isfinite().all()  # ignored rows get no gradient
    loss_only = cross_entropy_rows_(logits.clone(), targets, -100, False)
    assert (loss_only - loss_theirs).abs().max().item() < 1e-4


@cuda
def test_fused_loss_eager_and_compiled_equal_fp32_cross_entropy():
    from smolhub.loss import linear_cross_entropy, reference_linear_cross_entropy

    N, C, V = 8192, 768, 50304
    hidden = torch.randn(N, C, device="cuda", requires_grad=True)
    weight = (torch.randn(V, C, device="cuda") * 0.02).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::101] = -100

    def loss_and_grads(fn, amp=True):
        hidden.grad = weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = fn(hidden, weight, targets)
        loss.backward()
        return loss.detach(), hidden.grad, weight.grad

    exact = loss_and_grads(reference_linear_cross_entropy, amp=False)
    torch._dynamo.reset()
    for fn in (linear_cross_entropy, torch.compile(linear_cross_entropy, fullgraph=True)):
        loss, d_hidden, d_weight = loss_and_grads(fn)
        assert rel_err(loss, exact[0]) < 1e-5
        assert rel_err(d_hidden, exact[1]) < 1e-2 and rel_err(d_weight, exact[2]) < 1e-2


@cuda
def test_layer_speed_benchmark_runs_at_a_toy_size():
    from benchmarks import layer_speed

    results = layer_speed.main(["--scale", "0.05"])
    assert sorted(results) == sorted(layer_speed.PARTS)
    assert all(value > 0 for rows in results.values() for value in rows.values())


# --- decoding -----------------------------------------------------------------------------------

def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


@cuda
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_cuda_graph_decoders_equal_eager_cached_decoding(name):
    """bf16, teacher-forced over 96 positions: the eager cache against the full forward, then the
    CUDA-graph decoder (the captured eager step and the compiled step) against the eager cache.
    StoryMixtral gets a 16-token window, so its ring buffer wraps around. Random weights make router
    near-ties common, so a few positions may route differently between two bf16 paths: hence a
    bound on the relative error and on the share of positions whose argmax differs."""
    from smolhub.generate import GraphDecoder

    torch.manual_seed(0)
    extra = {"sliding_window": 16} if name == "StoryMixtral" else {}
    model = tiny_model(name, vocab_size=32000, **extra).cuda().to(torch.bfloat16).eval()
    assert GraphDecoder.usable(model, torch.device("cuda"))
    seq = torch.randint(0, 32000, (1, 96), device="cuda")
    with torch.inference_mode():
        full = model(seq)[0].float()[:, 7:95]
        cache = model.make_kv_cache(1, model.config.block_size, "cuda", torch.bfloat16)
        eager = [model(seq[:, :8], kv_cache=cache, start_pos=0)[0][:, -1].float()]
        eager += [model(seq[:, t:t + 1], kv_cache=cache, start_pos=t)[0][:, -1].float() for t in range(8, 95)]
        eager = torch.stack(eager, 1)
        assert rel_err(eager, full) < 5e-2 and agreement(eager, full) > 0.9
        torch._dynamo.reset()
        for compile in (False, True):
            decoder = GraphDecoder(model, 1, torch.device("cuda"), torch.bfloat16, compile=compile)
            graph = [model(seq[:, :8], kv_cache=decoder.cache, start_pos=0)[0][:, -1].float()]
            for t in range(8, 95):
                graph.append(decoder.step(seq[:, t:t + 1], torch.tensor(t, device="cuda")).clone())
            graph = torch.stack(graph, 1)
            assert rel_err(graph, eager) < 5e-2 and agreement(graph, eager) > 0.9, (compile, rel_err(graph, eager))


# --- the trainer --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """Every model's trainer.py on synthetic stories, compiled, CUDA graphs on and off, as
    {(model, graphs): (future of (records, stdout), output folder)}: the ten runs start together,
    since compiling, most of their time, runs on the CPU cores."""
    pool = ThreadPoolExecutor(max_workers=2 * len(ARCHITECTURES))
    runs = {}
    for graphs in ("true", "false"):
        workdir = tmp_path_factory.mktemp(f"graphs-{graphs}")
        for name in ARCHITECTURES:
            future = pool.submit(run_tiny_trainer, name, "synthetic", workdir, name, "--compile", "true",
                                 "--cuda_graphs", graphs)
            runs[name, graphs] = future, workdir / name
    yield runs
    pool.shutdown(cancel_futures=True)


def assert_complete_run(records: list[dict], stdout: str, out_dir) -> None:
    """Six logged losses falling, an evaluation at the end, two samples and two checkpoints."""
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert stdout.count(" sample: ") == 2 and "val_loss" in records[-1]
    assert sorted(p.name for p in out_dir.glob("ckpt-*")) == ["ckpt-0000030", "ckpt-0000060"]


@cuda
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_trainer_with_cuda_graphs_on_and_off(name, trainer_runs):
    """Both runs complete and log the same losses to bf16 rounding. An MoE model's two runs drift
    apart once rounding flips a token's expert, so theirs are held to a looser bound."""
    losses = {}
    for graphs in ("true", "false"):
        future, out_dir = trainer_runs[name, graphs]
        records, stdout = future.result()
        assert_complete_run(records, stdout, out_dir)
        losses[graphs] = [r["loss"] for r in records if "loss" in r]
    diff = max(abs(a - b) for a, b in zip(losses["true"], losses["false"]))
    assert diff < (2e-3 if name in ("SmolTransformer", "StoryLlama") else 0.15), diff


def test_trainer_run_resolves_a_text_path_relative_to_the_caller(tmp_path, monkeypatch):
    """The GPU test's trainer run, on CPU: the trainer runs in the model's folder, so a path relative
    to the caller's folder must reach it resolved."""
    (tmp_path / "input.txt").write_bytes(SHAKESPEARE.read_bytes())
    monkeypatch.chdir(tmp_path)
    records, stdout = run_tiny_trainer("SmolTransformer", "input.txt", tmp_path / "work", "run")
    assert_complete_run(records, stdout, tmp_path / "work" / "run")
