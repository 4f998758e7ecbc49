"""The GPU benchmarks' CPU path, at toy sizes, so they cannot rot. Nothing here asserts a speed."""
import gzip
import json

import pytest

from benchmarks import quality
from conftest import GPT2_DIR, SHARED_DATA


def few_books(tmp_path):
    """The first 60,000 characters of the gutenberg training books and 20,000 of the held-out ones."""
    books = tmp_path / "books"
    books.mkdir()
    for src, dst, n in (("train-00.txt.gz", "train.txt", 60_000), ("valid.txt.gz", "valid.txt", 20_000)):
        with gzip.open(SHARED_DATA / "gutenberg" / src, "rt", encoding="utf-8") as f:
            (books / dst).write_text(f.read(n))
    return books


def test_quality_benchmark_produces_table_and_curves(tmp_path, capsys):
    books = few_books(tmp_path)
    out = tmp_path / "out"
    quality.main(["--data", str(books), "--gpt2", str(GPT2_DIR), "--models", "StoryLlama", "SmolMixtral", "--tiny",
                  "--tokens", "1024", "--tokens_per_step", "256", "--evals", "2", "--eval_batches", "2",
                  "--bpe_vocab", "300", "--num_proc", "1", "--sample_tokens", "8", "--device", "cpu",
                  "--out", str(out)])
    table = capsys.readouterr().out
    assert "HF LlamaForCausalLM" in table and "HF MixtralForCausalLM" in table
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results] == ["StoryLlama", "SmolMixtral"]
    assert len(results[0]["runs"]) == 3  # two seeds of ours (the noise estimate) and the reference
    for r in results:  # three samples from each trained model, for the same prompts
        assert [s["prompt"] for s in r["runs"][0]["samples"]] == quality.SAMPLE_PROMPTS
    for name in ("StoryLlama", "SmolMixtral"):
        assert (out / f"quality_{name}.png").stat().st_size > 1000


def test_quality_benchmark_splits_smoltransformers_gap_to_gpt2(tmp_path, capsys):
    """--gpt2_as_ours trains a third SmolTransformer run, GPT-2 with SmolTransformer's function; with
    --same_init it starts from our weights, so at step 0 it and ours have the same loss and GPT-2 another."""
    books = few_books(tmp_path)
    out = tmp_path / "out"
    quality.main(["--data", str(books), "--gpt2", str(GPT2_DIR), "--models", "SmolTransformer", "--tiny",
                  "--tokens", "1024", "--tokens_per_step", "256", "--evals", "2", "--eval_batches", "2",
                  "--noise_seeds", "1", "--num_proc", "1", "--sample_tokens", "4", "--device", "cpu",
                  "--fp32_residual", "--same_init", "--gpt2_as_ours", "--out", str(out)])
    runs = json.loads((out / "results.json").read_text())[0]["runs"]
    assert [r["label"] for r in runs] == ["SmolHub SmolTransformer (adamw, fp32 residual)",
                                          "HF GPT2LMHeadModel (our init)",
                                          "HF GPT2LMHeadModel as ours (RMSNorm, no biases) (our init)"]
    assert "as ours (RMSNorm, no biases)" in capsys.readouterr().out
    ours, gpt2, as_ours = (r["val_loss"] for r in runs)
    assert abs(ours - as_ours) < 1e-4 < abs(ours - gpt2)  # fp32 on CPU: the same function trains alike


def test_gpt2_as_ours_without_smoltransformer_is_refused(capsys):
    with pytest.raises(SystemExit):
        quality.main(["--data", "books", "--gpt2", "gpt2", "--models", "StoryLlama", "--gpt2_as_ours"])
    assert "add SmolTransformer to --models" in capsys.readouterr().err


def pair_with_the_same_weights(name: str, gpt2_as_ours: bool = True):
    """The quality benchmark's tiny pair of `name`, ours loaded into the twin as the benchmark's --same_init
    does: (ours, twin as HFSide). SmolTransformer's GPT-2 twin computes our function unless told not to."""
    import argparse

    import torch

    from benchmarks.common import gpt2_as_smoltransformer, load_ours_into_twin

    torch.manual_seed(0)
    ours, hf, _ = quality.build_pair(name, 512, argparse.Namespace(tiny=True))
    if name == "SmolTransformer" and gpt2_as_ours:
        gpt2_as_smoltransformer(hf, ours.config.norm_eps)
    load_ours_into_twin(name, ours, hf)
    return ours, quality.HFSide(hf, 0.0)


@pytest.mark.parametrize("name", ["StoryLlama", "SmolTransformer"])
def test_quality_pair_trains_identically_from_the_same_weights(name):
    """The quality benchmark's two sides, started from the same weights (ours loaded into the
    transformers twin; GPT-2's LayerNorms made RMSNorms and its biases held at zero), follow the same loss
    curve in fp32: its comparison is fair up to the init draw and GPU numerics. Each side uses its benchmark
    optimizer: the engine's for ours, AdamW over adamw_param_groups for the twin."""
    import torch

    from smolhub.config import TrainConfig
    from smolhub.optim import adamw_param_groups, build_optimizer, build_scheduler

    ours, twin = pair_with_the_same_weights(name)
    train = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=3, max_steps=20, weight_decay=0.1)
    ours_opt = build_optimizer(ours, train, "cpu")
    twin_opt = torch.optim.AdamW(adamw_param_groups(twin, train.weight_decay), lr=train.lr,
                                 betas=(train.beta1, train.beta2))
    sides = [(ours, ours_opt, build_scheduler(ours_opt, train)), (twin, twin_opt, build_scheduler(twin_opt, train))]
    batches = torch.Generator().manual_seed(1)
    curves = [[], []]
    for _ in range(20):
        x = torch.randint(0, 512, (8, 65), generator=batches)
        for (model, opt, sched), curve in zip(sides, curves):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            sched.step()
            curve.append(loss.item())
    assert curves[0][0] != curves[0][-1]  # it trained
    torch.testing.assert_close(curves[0], curves[1], rtol=0, atol=1e-5)
    if name == "SmolTransformer":  # the frozen biases are still zero after training
        assert all(not p.any() for n, p in twin.named_parameters() if n.endswith(".bias"))


@pytest.mark.parametrize("name", ["StoryLlama", "StoryMixtral", "StoryKimi", "SmolTransformer"])
def test_quality_pair_has_the_same_loss_from_the_same_weights(name):
    """Our model and its transformers twin, given the same weights, compute the same cross-entropy
    (the MoE pairs' training totals differ only by their balancing terms, by design)."""
    import torch

    ours, twin = pair_with_the_same_weights(name)
    x = torch.randint(0, 512, (8, 65), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, loss = ours.eval()(x[:, :-1], x[:, 1:])
        _, twin_loss = twin.eval()(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - twin_loss.item()) < 1e-5


def test_gpt2_twin_differs_from_smoltransformer_by_its_layernorms():
    """GPT-2 itself, given our weights (zero biases, unit gains), is a different function: its LayerNorms
    centre the stream, which is why the benchmark can turn them into RMSNorms to compare implementations."""
    import torch

    ours, twin = pair_with_the_same_weights("SmolTransformer", gpt2_as_ours=False)
    x = torch.randint(0, 512, (8, 65), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, loss = ours.eval()(x[:, :-1], x[:, 1:])
        _, twin_loss = twin.eval()(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - twin_loss.item()) > 1e-4


@pytest.mark.parametrize("limit", [0, 1, 15, 16, 17, 100, 511, 512, 4096, 5000])
def test_memory_search_finds_the_largest_fitting_batch(limit):
    """benchmarks.memory's search (doubling from 16, then bisection, capped) against every limit
    shape: nothing fits, below the start, exactly on a doubling, between, at and beyond the cap."""
    from benchmarks.memory import largest_fitting

    probed = []

    def peak_of(batch):
        probed.append(batch)
        return batch * 0.5 if batch <= limit else None

    batch, peak = largest_fitting(peak_of, start=16, cap=4096)
    expected = min(limit, 4096)
    assert batch == expected
    assert peak == (expected * 0.5 if expected else None)
    assert all(b <= 4096 for b in probed) and len(probed) <= 2 * 13


@pytest.mark.parametrize("kernel, category", [  # names as an H100 profile printed them (cut at 120 characters)
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, false, float, "
     "__nv_bfloat16,", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0",
     "attention"),
    ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int, unsigned int, unsigned int, "
     "unsigned in", "attention"),
    ("triton_red_fused__log_softmax__to_copy__unsafe_view_prepare_softmax_online_view_10", "cross-entropy"),
    ("triton_per_fused__fused_rms_norm__fused_rms_norm_backward__to_copy_add_embedding_dense_backward_nll_loss_"
     "forward_view_9", "norm"),
    ("triton_poi_fused__unsafe_view_cat_mul_silu_silu_backward_split_view_3", "activation"),
    ("triton_poi_fused__unsafe_view_gelu_gelu_backward_view_3", "activation"),
    ("triton_poi_fused__to_copy_add_cat_mul_neg_slice_transpose_unsqueeze_view_7", "rotary"),
    ("_rotary_qkv", "rotary"),  # smolhub.kernels
    ("_cross_entropy_rows", "cross-entropy"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "FusedOptimizerTenso", "optimizer"),
    ("triton_poi_fused_cat_transpose_view_6", "other"),
])
def test_profile_sorts_kernels_by_what_they_compute(kernel, category):
    from benchmarks.train_throughput import kernel_category

    assert kernel_category(kernel) == category


def test_idle_time_counts_only_what_no_kernel_covers():
    from benchmarks.train_throughput import idle_time

    # a kernel inside another, two overlapping, then gaps of 2 and 5 (order of arrival must not matter)
    spans = [(20.0, 30.0), (0.0, 10.0), (2.0, 4.0), (8.0, 18.0), (35.0, 36.0)]
    assert idle_time(spans) == 2.0 + 5.0
    assert idle_time([(0.0, 1.0)]) == 0.0


def test_loss_memory_benchmark_shows_the_fused_loss_holds_less():
    from benchmarks import loss_memory

    plain, fused = loss_memory.main(["--tokens", "4096", "--dim", "8", "--vocab", "50304", "--device", "cpu"])
    assert plain["variant"] == "F.cross_entropy" and fused["variant"] == "smolhub fused"
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    # F.cross_entropy(logits.float()) holds ~6x the bf16 logits at its peak; the fused loss ~3x at
    # this size, most of it the fixed ~0.5 GB of one fp32 chunk and its logsumexp temporary
    assert fused["peak_growth_gib"] < 0.6 * plain["peak_growth_gib"]


def test_decode_table_marks_what_did_not_run(capsys):
    from benchmarks.decode_speed import print_table

    ran = {"tok_per_s": 1026.0, "first_tok_per_s": 7.0}
    print_table([{"model": "StoryKimi", "batch": 1, "ours_compiled": ran, "hf_static": {"tok_per_s": 386.0}},
                 {"model": "StoryKimi", "batch": 16, "ours_compiled": ran}])
    first, second = capsys.readouterr().out.strip().splitlines()[-2:]
    assert first.split() == ["StoryKimi", "1", "-", "-", "-", "1,026", "7", "-", "386", "2.66x"]
    assert second.split() == ["StoryKimi", "16", "-", "-", "-", "1,026", "7", "-", "-", "-"]

