"""Mixture-of-experts layers: grouped dispatch and the Triton kernels against the loop, routers,
balancing losses, capacity."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, tiny_model
from smolhub.errors import UserError
from smolhub.layers import GroupedExperts, MoEFeedForward, NoisyTopKRouter, SoftmaxTopKRouter, moe_aux_loss
from smolhub.layers.moe import (drop_over_capacity, expert_counts, inverse_permutation, permute_rows, router_z_loss,
                               switch_balance_loss, top_k_indices)


pytestmark = pytest.mark.usefixtures("one_thread")


def per_token_reference(experts: GroupedExperts, x, expert_idx, weights):
    """sum_k w_k * down_e(silu(x W_gate,e) * x W_up,e), one token and one slot at a time."""
    out = []
    for n in range(x.size(0)):
        y = 0
        for slot in range(expert_idx.size(1)):
            e = int(expert_idx[n, slot])
            gate, up = (x[n] @ experts.gate_up[e]).split(experts.hidden)
            y = y + weights[n, slot] * ((F.silu(gate) * up) @ experts.down[e])
        out.append(y)
    return torch.stack(out)


def routing(n_tokens, n_experts, k, used, seed):
    """Random top-k routing onto the experts listed in `used` (the others get no tokens)."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(used)
    idx = torch.stack([used[torch.randperm(len(used), generator=g)[:k]] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, k, generator=g).softmax(-1)
    return idx, weights


def test_loop_path_matches_per_token_reference():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 24, kernel="loop").double()
    x = torch.randn(13, 16, dtype=torch.float64)
    idx, w = routing(13, 4, 2, [0, 1, 3], seed=0)
    torch.testing.assert_close(experts(x, idx, w.double()), per_token_reference(experts, x, idx, w.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("used", [[0, 1, 2, 3, 4, 5], [1, 4, 5], [2, 3]], ids=["all", "3-of-6", "2-of-6"])
def test_grouped_mm_equals_loop_forward_and_backward(dtype, used):
    """torch._grouped_mm (forced on CPU) == the per-expert loop, outputs and every gradient, with
    experts that receive no tokens (their weight gradients must be exactly zero)."""
    torch.manual_seed(1)
    idx, w = routing(37, 6, 2, used, seed=len(used))
    x = torch.randn(37, 32)
    results = []
    results = [run_experts(kernel, x, idx, w, dtype) for kernel in ("grouped_mm", "loop")]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for grouped, loop in zip(*results):
        torch.testing.assert_close(grouped.float(), loop.float(), **tol)
    unused = [e for e in range(6) if e not in used]
    for grad in results[0][3:]:
        assert grad[unused].abs().sum() == 0 and grad[used].abs().sum() > 0


def run_experts(kernel, x, idx, w, dtype=torch.float32, n_experts=6, hidden=48):
    """[output, and the gradients of x, the routing weights, gate_up and down] of GroupedExperts
    with the given kernel and seeded weights, under a non-uniform upstream gradient plus .sum(),
    whose gradient is expanded (see PITFALLS)."""
    experts = GroupedExperts(n_experts, x.size(1), hidden, kernel=kernel)
    torch.manual_seed(2)
    experts.reset_parameters(std=0.2)
    experts.to(dtype)
    xi = x.to(dtype).requires_grad_()
    wi = w.to(dtype).requires_grad_()
    out = experts(xi, idx, wi)
    (out * torch.linspace(-1, 1, x.size(1), dtype=dtype)).sum().backward(retain_graph=True)
    out.sum().backward()
    return [out, xi.grad, wi.grad, experts.gate_up.grad, experts.down.grad]


@pytest.mark.parametrize("dim,tokens", [(32, 37), (64, 300)], ids=["ragged-blocks", "several-tiles-an-expert"])
@pytest.mark.parametrize("used", [[0, 1, 2, 3, 4, 5], [1, 4, 5], [2, 3]], ids=["all", "3-of-6", "2-of-6"])
def test_triton_kernels_equal_loop_forward_and_backward(interpreted_triton, dim, tokens, used):
    """The Triton path (gathers, SwiGLU and scatter inside the matmuls) == the per-expert loop, output
    and every gradient, in fp32 under the interpreter, to fp32 rounding of the largest entry: with
    experts that get no tokens (zero weight gradients), every token on the same two experts, a width
    below one K block (masked) and one of exact blocks, and experts with more rows than one tile."""
    torch.manual_seed(1)
    idx, w = routing(tokens, 6, 2, used, seed=len(used))
    x = torch.randn(tokens, dim)
    results = [run_experts(kernel, x, idx, w) for kernel in ("triton", "loop")]
    for triton_result, loop in zip(*results):
        assert (triton_result - loop).abs().max() <= 1e-6 * loop.abs().max()
    unused = [e for e in range(6) if e not in used]
    for grad in results[0][3:]:
        assert grad[unused].abs().sum() == 0 and grad[used].abs().sum() > 0


@pytest.mark.parametrize("kernel", ["grouped_mm", "triton"])
def test_every_token_on_one_expert_with_top_1(kernel, request):
    """Top-1 routing where every token picks expert 4: one expert holds all the rows (several tiles),
    the other five none. Output and gradients equal the loop; the idle experts' weight gradients are zero."""
    if kernel == "triton":
        request.getfixturevalue("interpreted_triton")
    torch.manual_seed(4)
    idx, w = routing(300, 6, 1, [4], seed=4)
    x = torch.randn(300, 32)
    results = [run_experts(name, x, idx, w) for name in (kernel, "loop")]
    for fast, loop in zip(*results):
        assert (fast - loop).abs().max() <= 1e-6 * loop.abs().max()
    for grad in results[0][3:]:
        assert grad[[0, 1, 2, 3, 5]].abs().sum() == 0 and grad[4].abs().sum() > 0


@pytest.mark.parametrize("name", ["SmolMixtral", "StoryMixtral", "StoryKimi"])
def test_moe_models_take_the_triton_kernels_from_their_config(interpreted_triton, name):
    """--experts_kernel reaches every MoE model's experts: a tiny model's training loss and gradients
    with the Triton kernels equal those with the loop."""
    results = []
    for kernel in ("triton", "loop"):
        torch.manual_seed(0)
        model = tiny_model(name, experts_kernel=kernel).train()
        idx = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
        _, loss = model(idx, idx)
        (loss + model.aux_loss()).backward()
        results.append([loss] + [p.grad for p in model.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) > 10
    for triton_result, loop in zip(*results):
        assert (triton_result - loop).abs().max() <= 1e-5 * loop.abs().max()


def test_triton_kernels_compile_for_an_h100_with_pipelined_loops_and_for_older_gpus():
    """Every launch of a training step, compiled through the triton wheel's ptxas as the JIT would
    specialise it (tests/triton_aot.py): the interpreter runs the kernels' Python, not what the
    compiler accepts. For sm_90 each uses wgmma and pipelines its loop (num_stages buffers of its A
    and B tiles in shared memory); on an H100, an A100 and an Ada card each fits the shared memory
    of a block and spills no registers."""
    pytest.importorskip("triton", minversion="3.6")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "triton_aot.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launches = [json.loads(line) for line in proc.stdout.splitlines()]
    step = [("_rows_kernel", True, False), ("_rows_kernel", False, False), ("_weight_grad_kernel", None, None),
            ("_rows_kernel", False, True), ("_weight_grad_kernel", None, None), ("_rows_kernel", False, False)]
    shared_per_block = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024}
    assert [(launch["capability"], launch["kernel"], launch["flags"].get("SWIGLU_OUT"),
             launch["flags"].get("SWIGLU_GRAD")) for launch in launches] == [
        (capability, *launch) for capability in shared_per_block for launch in step]
    for launch in launches:
        assert launch["spill_bytes"] == 0 and launch["shared"] <= shared_per_block[launch["capability"]], launch
        if launch["capability"] == 90:
            # an unpipelined loop keeps one buffer of its A and B tiles in shared memory, a pipelined one
            # num_stages (or num_stages - 1) of them; SWIGLU_OUT reads two B tiles (gate and up)
            rows, cols, depth = launch["blocks"]
            b_tiles = 2 if launch["flags"].get("SWIGLU_OUT") else 1
            stage_bytes = 2 * (rows * depth + b_tiles * depth * cols)
            assert launch["wgmma"] and launch["shared"] >= (launch["num_stages"] - 1) * stage_bytes > stage_bytes, \
                launch


def test_triton_experts_op_passes_torch_opcheck(interpreted_triton):
    """torch.library.opcheck on the custom op: its schema, fake (meta) shapes for torch.compile, and
    autograd registration agree with what the kernels do."""
    torch.manual_seed(3)
    idx, _ = routing(20, 4, 2, [0, 1, 3], seed=3)
    experts = GroupedExperts(4, 32, 16, kernel="triton")
    order, ends = experts._sort(idx)
    order = order.to(torch.int32)
    args = (torch.randn(20, 32, requires_grad=True), experts.gate_up.detach().clone().requires_grad_(),
            experts.down.detach().clone().requires_grad_(), order, order // 2, ends)
    torch.library.opcheck(torch.ops.smolhub.scattered_experts.default, args)


@pytest.mark.parametrize("kernel", ["loop", "triton"])
def test_an_empty_batch_trains_through_the_experts(kernel, interpreted_triton):
    """No tokens: an empty output, an empty x gradient and zero weight gradients, on the loop and the
    Triton path alike (the latter's x gradient sums over the k slots outside its op)."""
    experts = GroupedExperts(4, 16, 8, kernel=kernel)
    x = torch.randn(0, 16, requires_grad=True)
    y = experts(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    y.sum().backward()
    assert y.shape == x.grad.shape == (0, 16)
    assert not experts.gate_up.grad.any() and not experts.down.grad.any()


def test_auto_is_the_exact_loop_on_cpu_even_where_the_interpreter_runs_triton(interpreted_triton):
    """auto picks the Triton kernels only on a CUDA GPU: the interpreter, on here, never stands in for
    the loop, in bf16 autocast as in fp32."""
    from smolhub.layers.moe import auto_experts_kernel

    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert auto_experts_kernel(x) == "loop"
    assert auto_experts_kernel(x) == "loop"


def test_triton_kernel_without_cuda_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    idx, w = routing(5, 2, 1, [0, 1], seed=0)
    with pytest.raises(UserError, match="needs a CUDA GPU and triton"):
        GroupedExperts(2, 16, 16, kernel="triton")(torch.randn(5, 16, requires_grad=True), idx, w)
    with pytest.raises(ValueError, match="not one of auto, grouped_mm, triton, loop"):
        GroupedExperts(2, 16, 16, kernel="cutlass")


def test_expert_counts_equal_bincount_with_idle_experts():
    idx, _ = routing(40, 7, 3, [0, 2, 3, 6], seed=9)
    assert torch.equal(expert_counts(idx, 7), torch.bincount(idx.reshape(-1), minlength=7))


def test_permute_rows_gradient_is_indexings():
    """permute_rows differentiates by gathering with the inverse permutation; the result equals
    plain indexing's scatter-add backward exactly, eager and traced (no graph break)."""
    g = torch.Generator().manual_seed(4)
    perm = torch.randperm(50, generator=g)
    inverse = inverse_permutation(perm)
    assert torch.equal(inverse, perm.argsort())
    x = torch.randn(50, 7, generator=g, requires_grad=True)
    upstream = torch.randn(50, 7, generator=g)
    expected = torch.autograd.grad((x[perm] * upstream).sum(), x)[0]
    for fn in (permute_rows, torch.compile(permute_rows, fullgraph=True, backend="aot_eager")):
        y = fn(x, perm, inverse)
        assert torch.equal(y, x[perm])
        assert torch.equal(torch.autograd.grad((y * upstream).sum(), x)[0], expected)


@pytest.mark.parametrize("n_tokens", [1, 5, 64, 65])
def test_decoding_without_gradients_matches_the_reference(n_tokens):
    """Up to dense_max_tokens tokens without gradients take the dense every-expert path (the rest the
    loop/grouped path); both equal the per-token reference, also with weights zeroed by capacity."""
    torch.manual_seed(3)
    experts = GroupedExperts(4, 16, 24).double()
    x = torch.randn(n_tokens, 16, dtype=torch.float64)
    idx, w = routing(n_tokens, 4, 2, [0, 2, 3], seed=n_tokens)
    w = w.double()
    w[0, 1] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(experts(x, idx, w), per_token_reference(experts, x, idx, w))
        torch.testing.assert_close(experts._dense(x, idx, w), per_token_reference(experts, x, idx, w))


def test_grouped_path_is_chosen_only_where_the_kernel_runs():
    experts = GroupedExperts(2, 16, 16)
    assert experts.kernel == "auto"  # the loop on this CPU box
    x = torch.randn(5, 16)
    idx, w = routing(5, 2, 1, [0, 1], seed=0)
    reference = GroupedExperts(2, 16, 16, kernel="loop")
    reference.load_state_dict(experts.state_dict())
    assert torch.equal(experts(x, idx, w), reference(x, idx, w))


@pytest.mark.parametrize("experts,k", [(8, 2), (4, 1), (16, 4), (64, 6)])  # 64: the torch.topk branch
def test_top_k_indices_equal_torch_topk(experts, k):
    scores = torch.randn(3, 50, experts, generator=torch.Generator().manual_seed(experts))
    assert torch.equal(top_k_indices(scores, k), scores.topk(k, dim=-1).indices)
    compiled = torch.compile(top_k_indices, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(scores, k), scores.topk(k, dim=-1).indices)


def test_top_k_indices_break_ties_towards_the_lower_index():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert top_k_indices(scores, 3).tolist() == [[1, 3, 0], [0, 1, 2]]


def test_router_weights_are_renormalised_top_k():
    torch.manual_seed(3)
    router = SoftmaxTopKRouter(16, 8, 2)
    x = torch.randn(50, 16)
    idx, w, aux = router(x)
    probs = (x @ router.gate.weight.T).softmax(-1)
    torch.testing.assert_close(w.sum(-1), torch.ones(50))
    assert torch.equal(idx, probs.topk(2, dim=-1).indices)
    torch.testing.assert_close(w, probs.gather(1, idx) / probs.gather(1, idx).sum(-1, keepdim=True))
    assert aux["counts"].sum() == 100 and aux["counts"].shape == (8,)
    assert torch.equal(aux["counts"], torch.bincount(idx.flatten(), minlength=8))


def test_router_runs_in_fp32_under_autocast():
    router = SoftmaxTopKRouter(16, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, w, aux = router(torch.randn(6, 16))
    assert w.dtype == torch.float32 and aux["balance"].dtype == torch.float32


def test_noisy_router_adds_noise_in_training_only():
    torch.manual_seed(4)
    noisy = NoisyTopKRouter(16, 8, 2)
    clean = SoftmaxTopKRouter(16, 8, 2)
    clean.gate.weight.data = noisy.gate.weight.data.clone()
    x = torch.randn(200, 16)
    noisy.eval()
    a, b = noisy(x), noisy(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # deterministic
    assert torch.equal(a[0], clean(x)[0]) and torch.equal(a[1], clean(x)[1])  # = the noiseless router
    noisy.train()
    c, d = noisy(x), noisy(x)
    assert not torch.equal(c[1], d[1]) and not torch.equal(c[1], a[1])
    torch.testing.assert_close(c[1].sum(-1), torch.ones(200))
    # the noise scale is learned: the balancing loss reaches W_noise through the noisy probabilities
    c[2]["balance"].backward()
    assert noisy.noise.weight.grad.abs().sum() > 0
    # the fused gate + noise matmul computes Shazeer's formula with the two projections apart
    torch.manual_seed(5)
    clean_logits, routing = noisy.logits(x)
    torch.manual_seed(5)
    expected = x @ noisy.gate.weight.t()
    expected = expected + torch.randn_like(expected) * F.softplus(x @ noisy.noise.weight.t())
    torch.testing.assert_close(clean_logits, x @ noisy.gate.weight.t())
    torch.testing.assert_close(routing, expected)


def hand_made_router():
    """Two experts, four tokens, logits chosen so every number below is exact.

    Rows (ln 3, 0) give probabilities (3/4, 1/4); three tokens prefer expert 0, one prefers expert 1."""
    router = SoftmaxTopKRouter(2, 2, 1)
    router.gate.weight.data = torch.eye(2)
    x = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0], [0.0, math.log(3)], [math.log(3), 0.0]])
    return router, x


def test_switch_loss_and_z_loss_equal_their_formulas_by_hand():
    router, x = hand_made_router()
    idx, w, aux = router(x)
    assert idx.flatten().tolist() == [0, 0, 1, 0] and torch.equal(w, torch.ones(4, 1))
    # f = (3/4, 1/4); P = mean probabilities = (2.5/4, 1.5/4); loss = E * sum f P = 2 * 0.5625
    torch.testing.assert_close(aux["balance"], torch.tensor(1.125))
    # logsumexp of every row is ln(3 + 1) = ln 4
    torch.testing.assert_close(aux["z"], torch.tensor(math.log(4) ** 2))


def test_switch_loss_is_one_when_balanced_and_E_when_collapsed():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    assert switch_balance_loss(uniform, torch.full((E,), 4)).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), E).float()
    assert switch_balance_loss(collapsed, torch.tensor([8, 0, 0, 0])).item() == pytest.approx(E)
    assert router_z_loss(torch.zeros(3, E)).item() == pytest.approx(math.log(E) ** 2)


def test_aux_losses_are_weighted_means_over_layers_and_reach_the_router():
    torch.manual_seed(5)
    layers = torch.nn.ModuleList(
        MoEFeedForward(SoftmaxTopKRouter(16, 4, 2), GroupedExperts(4, 16, 8)) for _ in range(2))
    assert moe_aux_loss(layers, 0.01, 0.001) is None  # nothing routed in training yet
    x = torch.randn(3, 5, 16)
    for layer in layers:
        x = x + layer(x)
    expected = sum(0.01 * m.aux["balance"] + 0.001 * m.aux["z"] for m in layers) / 2
    loss = moe_aux_loss(layers, 0.01, 0.001)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(m.router.gate.weight.grad.abs().sum() > 0 for m in layers)


def test_eval_forward_keeps_the_last_training_routing():
    layer = MoEFeedForward(SoftmaxTopKRouter(16, 4, 2), GroupedExperts(4, 16, 8))
    layer(torch.randn(2, 3, 16))
    train_aux = layer.aux
    layer.eval()
    layer(torch.randn(2, 7, 16))
    assert layer.aux is train_aux


def test_capacity_drops_the_lowest_weighted_assignments():
    # 6 assignments, 2 experts, capacity_factor 1 -> 3 per expert; expert 0 gets 4 of them
    idx = torch.tensor([[0, 1], [0, 1], [0, 1]])
    w = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])
    kept = drop_over_capacity(idx, w, 2, 1.0)
    torch.testing.assert_close(kept, w)  # 3 each: nothing dropped
    idx = torch.tensor([[0, 1], [0, 1], [1, 0]])
    w = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])
    kept = drop_over_capacity(idx, w, 2, 0.5)  # capacity ceil(0.5 * 6 / 2) = 2 per expert
    # expert 0 holds 0.9, 0.6, 0.3 -> drops 0.3; expert 1 holds 0.1, 0.4, 0.7 -> drops 0.1
    torch.testing.assert_close(kept, torch.tensor([[0.9, 0.0], [0.6, 0.4], [0.7, 0.0]]))


def test_capacity_off_by_default_and_on_drops_tokens_in_the_layer():
    torch.manual_seed(6)
    router, experts = SoftmaxTopKRouter(16, 4, 2), GroupedExperts(4, 16, 8)
    x = torch.randn(1, 64, 16)
    full = MoEFeedForward(router, experts)(x)
    idx, w, _ = router(x.view(-1, 16))
    torch.testing.assert_close(full.view(-1, 16), experts(x.view(-1, 16), idx, w))
    capped = MoEFeedForward(router, experts, capacity_factor=0.5)(x)
    torch.testing.assert_close(capped.view(-1, 16), experts(x.view(-1, 16), idx, drop_over_capacity(idx, w, 4, 0.5)))
    assert not torch.allclose(capped, full)


def test_residual_init_scaling_reaches_the_stacked_experts():
    experts = GroupedExperts(8, 256, 256)
    experts.reset_parameters(std=0.02, residual_scale=0.25)
    assert experts.gate_up.std().item() == pytest.approx(0.02, rel=0.02)
    assert experts.down.std().item() == pytest.approx(0.005, rel=0.02)


def test_trainer_with_the_triton_experts_resumes_exactly(interpreted_triton, tmp_path):
    """SmolMixtral's trainer.py with --experts_kernel triton (the kernels in the interpreter): 8 steps
    straight, and the same run resumed from its step-4 checkpoint, end with the same losses and
    weights bit for bit, the kernels being deterministic (no atomics)."""
    from safetensors.torch import load_file

    from conftest import SHAKESPEARE, run_script

    args = ["trainer.py", "--preset", "tiny", "--dataset", str(SHAKESPEARE), "--data_dir", str(tmp_path / "data"),
            "--experts_kernel", "triton", "--deterministic", "--sample_interval", "0", "--max_steps", "8",
            "--save_interval", "4", "--eval_interval", "4", "--eval_batches", "2", "--log_interval", "1",
            "--warmup_steps", "2", "--batch_size", "4", "--seq_len_stages", "64", "--tokens_per_step", "512"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script([*args, "--out_dir", str(straight)], REPO / "SmolMixtral", tmp_path)
    resumed.mkdir()
    shutil.copytree(straight / "ckpt-0000004", resumed / "ckpt-0000004")
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")
    run_script([*args, "--out_dir", str(resumed), "--resume"], REPO / "SmolMixtral", tmp_path)
    a, b = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (straight, resumed))
    losses = [(r["step"], r.get("loss"), r.get("val_loss")) for r in a if "loss" in r or "val_loss" in r]
    assert len([loss for _, loss, _ in losses if loss is not None]) == 8
    assert losses == [(r["step"], r.get("loss"), r.get("val_loss")) for r in b if "loss" in r or "val_loss" in r]
    config = json.loads((straight / "ckpt-0000008" / "config.json").read_text())
    assert config["model"]["experts_kernel"] == "triton"
    wa = load_file(str(straight / "ckpt-0000008" / "model.safetensors"))
    wb = load_file(str(resumed / "ckpt-0000008" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[name], wb[name]) for name in wa)
