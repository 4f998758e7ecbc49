"""benchmarks/moe_profile.py on tiny presets, and the MoE-vs-dense study specs."""
import pytest
import torch
from conftest import REPO

import smolhub.layers.moe as moe
from benchmarks import moe_profile
from smolhub.compare import load_study
from smolhub.config import pad_vocab
from smolhub.modeling import model_class
from smolhub.train import parse_train_flags

MOE_PARTS = {"router", "top-k", "permutation", "grouped matmuls", "combine", "balancing", "attention", "norms",
             "embedding", "head + loss", "optimizer"}


@pytest.mark.parametrize("model, extra_parts", [("SmolMixtral", set()), ("StoryMixtral", set()),
                                                ("StoryKimi", {"shared expert", "dense FFN"})])
def test_profile_attributes_the_whole_step_to_the_model_parts(model, extra_parts, capsys):
    originals = {name: getattr(moe, name) for name in ("top_k_indices", "permute_rows", "_grouped_mm")}
    r = moe_profile.main(["--model", model, "--device", "cpu", "--preset", "tiny", "--batch", "16", "--steps", "2",
                          "--warmup", "1"])
    parts = r["parts_ms"]
    assert MOE_PARTS | extra_parts <= set(parts)
    assert ("shared expert" in parts) == ("shared expert" in extra_parts)
    assert all(parts[p] > 0 for p in MOE_PARTS | extra_parts), parts
    assert sum(parts.values()) == pytest.approx(r["kernels_ms"], rel=1e-6)  # every op's time in exactly one part
    assert torch.isfinite(torch.tensor(r["loss"]))
    out = capsys.readouterr().out
    assert "| grouped matmuls |" in out and "Top 15 operators" in out
    assert {name: getattr(moe, name) for name in originals} == originals  # the labels are gone after the profile


def test_profile_of_the_triton_experts_counts_their_kernels_as_grouped_matmuls(interpreted_triton):
    r = moe_profile.main(["--model", "SmolMixtral", "--device", "cpu", "--preset", "tiny", "--batch", "4",
                          "--steps", "1", "--warmup", "1", "--experts_kernel", "triton"])
    parts = r["parts_ms"]
    assert parts["grouped matmuls"] > 0
    assert any("scattered_experts" in name for name, _ in r["top_kernels_ms"]), r["top_kernels_ms"]
    assert sum(parts.values()) == pytest.approx(r["kernels_ms"], rel=1e-6)


def active_params(model: str, words: list[str]) -> int:
    """The arm's model as its trainer builds it at GPT-2's vocabulary (the specs' tokenizer), counted on meta."""
    cls = model_class(model)
    mcfg, _ = parse_train_flags(cls, words)
    mcfg.vocab_size = pad_vocab(50257)
    with torch.device("meta"):
        return cls(mcfg).num_active_params()


@pytest.mark.parametrize("model", ["SmolMixtral", "StoryMixtral", "StoryKimi"])
@pytest.mark.parametrize("budget", ["tokens", "seconds"])
def test_moe_vs_dense_spec_matches_active_parameters(model, budget, monkeypatch):
    monkeypatch.chdir(REPO)  # the specs' relative paths are the checkout's
    study = load_study(f"benchmarks/studies/moe_vs_dense_{model}_{budget}.yaml")
    assert study.budget[0] == budget and study.seeds == [1, 2]
    assert [a.model for a in study.arms] == [model, "StoryLlama"]
    flags = " ".join(study.flags)
    assert "--tokens_per_step 131072" in flags and "--compile true" in flags
    moe_arm, dense_arm = (active_params(a.model, [*study.flags, *a.flags]) for a in study.arms)
    assert abs(dense_arm / moe_arm - 1) <= 0.03, (moe_arm, dense_arm)
    assert f"{moe_arm:,}" in (REPO / f"benchmarks/studies/moe_vs_dense_{model}_{budget}.yaml").read_text()


def test_gpu_annotations_of_regions_are_not_counted_as_kernel_time():
    """On CUDA a record_function region (torch's Optimizer.step#AdamW.step here) also shows on the GPU's
    timeline, as an annotation spanning its kernels and linked to the region's CPU event: its length is
    no work of its own, in the part table or the kernel table."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(name, start, end, device_type=DeviceType.CPU, annotation=False, **kwargs):
        return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, use_device="cuda",
                             device_type=device_type, is_user_annotation=annotation, **kwargs)

    region = event("Optimizer.step#AdamW.step", 0, 100, annotation=True)
    op = event("aten::_fused_adamw_", 10, 90)
    op.cpu_parent, region.cpu_children = region, [op]
    region.append_kernel("Optimizer.step#AdamW.step", 0, 95)  # its GPU-side annotation
    op.append_kernel("multi_tensor_apply_kernel", 0, 30)
    gpu = [event("Optimizer.step#AdamW.step", 5, 100, DeviceType.CUDA, annotation=True),
           event("multi_tensor_apply_kernel", 20, 50, DeviceType.CUDA)]
    parts, by_name = moe_profile.attribute([region, op, *gpu], cuda=True)
    assert sum(parts.values()) == 30 and parts["other"] == 30
    assert by_name == {"multi_tensor_apply_kernel": 30}
