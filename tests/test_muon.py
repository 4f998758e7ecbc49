"""Muon against torch.optim.Muon, its orthogonalised updates, and Muon + AdamW as the engine's one optimizer."""
import copy

import pytest
import torch

from conftest import tiny_model
from smolhub.config import TrainConfig
from smolhub.errors import UserError
from smolhub.muon import Muon, MuonWithAdamW, orthogonalize
from smolhub.optim import build_optimizer, build_scheduler


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", [(48, 24), (24, 48), (32, 32)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_equals_torch_muon_on_matrices(shape, nesterov, adjust_lr_fn):
    torch.manual_seed(0)
    ours, theirs = (torch.nn.Parameter(w) for w in torch.randn(2, *shape).unbind())
    theirs.data.copy_(ours.data)
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt_ours, opt_theirs = Muon([ours], **kwargs), torch.optim.Muon([theirs], **kwargs)
    for _ in range(4):
        grad = torch.randn(shape)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
        assert torch.equal(ours, theirs)
    assert torch.equal(opt_ours.state[ours]["momentum_buffer"], opt_theirs.state[theirs]["momentum_buffer"])


def test_expert_stacks_and_same_shaped_matrices_each_through_torch_muon():
    """A 3-D stack is one matrix per expert, and matrices of one shape share a batched iteration:
    every matrix still gets exactly torch.optim.Muon's update for it alone."""
    torch.manual_seed(1)
    stack = torch.nn.Parameter(torch.randn(4, 16, 40))
    matrices = [torch.nn.Parameter(torch.randn(16, 40)), torch.nn.Parameter(torch.randn(40, 16)),
                torch.nn.Parameter(torch.randn(16, 40))]
    singles = [torch.nn.Parameter(w.clone()) for w in [*stack.detach().unbind(), *(m.detach() for m in matrices)]]
    ours = Muon([stack, *matrices], lr=0.02, adjust_lr_fn="match_rms_adamw")
    theirs = torch.optim.Muon(singles, lr=0.02, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p in [stack, *matrices]:
            p.grad = torch.randn_like(p)
        for single, grad in zip(singles, [*stack.grad.unbind(), *(m.grad for m in matrices)]):
            single.grad = grad.clone()
        ours.step()
        theirs.step()
    for mine, single in zip([*stack.unbind(), *matrices], singles):
        assert torch.equal(mine, single)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_update_is_orthogonalised(dtype):
    """Five Newton-Schulz steps map singular values spread over two decades into the quintic's band
    around 1 (not exactly 1: the coefficients trade accuracy for speed of growth near 0)."""
    torch.manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(64, 32))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    grad = u @ torch.diag(torch.logspace(-2, 0, 32)) @ v.T
    s = torch.linalg.svdvals(orthogonalize(grad, dtype=dtype).float())
    assert s.min() > 0.6 and s.max() < 1.25, s
    # the step itself: with no momentum history and no weight decay, W moves by lr * NS(grad)
    w = torch.nn.Parameter(torch.zeros(64, 32))
    w.grad = grad
    Muon([w], lr=0.1, weight_decay=0.0, momentum=0.0, ns_dtype=dtype).step()
    s = torch.linalg.svdvals(-w.detach() / (0.1 * (64 / 32) ** 0.5))
    assert s.min() > 0.6 and s.max() < 1.25, s


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model("StoryKimi")
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), "cpu")
    assert isinstance(opt, MuonWithAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not muon & adamw and muon | adamw == set(names)
    assert {names[i] for i in adamw} == {n for n, p in model.named_parameters() if p.dim() == 1} | {"tok_emb.weight"}
    assert all(p.dim() in (2, 3) for g in opt.muon.param_groups for p in g["params"])
    assert any(p.dim() == 3 for g in opt.muon.param_groups for p in g["params"])  # the expert stacks
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 0.02]
    with pytest.raises(ValueError, match="matrices"):
        Muon([torch.nn.Parameter(torch.zeros(8))])


def train_steps(model, opt, sched, scaler, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, 320, (2, 17), generator=gen)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        scaler.scale(loss + model.aux_loss()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        model.after_optimizer_step()


def test_one_optimizer_to_the_engine_scheduler_scaler_and_resume():
    """The engine's loop (GradScaler, clipping, LambdaLR) drives both halves; a save/load in the middle
    continues exactly like an uninterrupted run."""
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, warmup_steps=2, max_steps=6)

    def setup():
        torch.manual_seed(3)
        model = tiny_model("StoryKimi").train()
        opt = build_optimizer(model, cfg, "cpu")
        return model, opt, build_scheduler(opt, cfg), torch.amp.GradScaler("cpu", init_scale=1024.0)

    model, opt, sched, scaler = setup()
    # GradScaler.unscale_ reaches the gradients of both halves
    idx = torch.randint(0, 320, (2, 17))
    model.eval()  # no routing statistics from this check
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    plain = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    check = torch.amp.GradScaler("cpu", init_scale=1024.0)
    check.scale(model(idx[:, :-1], idx[:, 1:])[1]).backward()
    check.unscale_(opt)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain))
    opt.zero_grad()
    model.train()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 / 3, 1e-3 / 3, 0.02 / 3])  # warmup
    train_steps(model, opt, sched, scaler, 3, seed=0)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * opt.param_groups[0]["lr"] / 1e-3)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                           "scaler": scaler.state_dict()})  # state_dict()s hold live tensors
    train_steps(model, opt, sched, scaler, 3, seed=1)

    resumed, opt2, sched2, scaler2 = setup()
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    scaler2.load_state_dict(saved["scaler"])
    assert opt2.param_groups[2] is opt2.muon.param_groups[0]  # the scheduler reaches the loaded groups
    train_steps(resumed, opt2, sched2, scaler2, 3, seed=1)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(opt.muon.state_dict()["state"][0]["momentum_buffer"],
                       opt2.muon.state_dict()["state"][0]["momentum_buffer"])
    with pytest.raises(UserError, match="--optimizer"):
        opt2.load_state_dict(torch.optim.AdamW(resumed.parameters()).state_dict())
