"""End-to-end training of StoryLlama's tiny preset on real text: learning, resume, DDP, kills, errors."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_script, script_env, tiny_train_args
from smolhub.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, load_trainer_state
from smolhub.config import TrainConfig
from smolhub.errors import UserError
from smolhub.runtime import Runtime
from smolhub.train import use_cuda_graphs

LLAMA = REPO / "StoryLlama"


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 300-step tiny run shared by the tests that need a trained checkpoint."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "out"
    run_script(tiny_train_args(out, tmp / "data", "--max_steps", "300", "--eval_interval", "100",
                               "--save_interval", "100", "--keep_last", "2"), LLAMA, tmp)
    return out


def test_training_lowers_val_loss(trained):
    records = metrics(trained)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert records[0]["step"] == 0 and len(val) == 4
    # a 512-token BPE starts near ln(512) = 6.2; 300 steps of real learning reach well under 4.5
    assert val[0] > 5.5 and val[-1] < 4.5, val
    assert all("lr" in r and "grad_norm" in r and "tok_per_s" in r for r in records if "loss" in r)
    assert (trained / "loss_curve.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(trained)] == ["ckpt-0000200", "ckpt-0000300"]  # keep_last 2


def test_inference_cli_and_python_api(trained, tmp_path):
    proc = run_script(["inference.py", "--checkpoint", str(trained), "--prompt", "ROMEO:", "--temperature", "0",
                       "--max_new_tokens", "20", "--json"], LLAMA)
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["prompt"] == "ROMEO:" and record["completion"] and record["tokens_per_s"] > 0
    assert 0 < record["tokens"] <= 20
    code = ("from inference import load_model, generate_text\n"
            f"model = load_model({str(trained)!r})\n"
            "print(repr(generate_text(model=model, prompt='ROMEO:', max_length=20, temperature=0)))\n")
    api = run_script(["-c", code], LLAMA)
    assert eval(api.stdout.strip()) == "ROMEO:" + record["completion"]
    streamed = run_script(["inference.py", "--checkpoint", str(trained), "--prompt", "ROMEO:", "--temperature",
                           "0", "--max_new_tokens", "20", "--stream"], LLAMA)
    assert streamed.stdout.strip() == ("ROMEO:" + record["completion"]).strip()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET:\nTo be\n")
    batch = run_script(["inference.py", "--checkpoint", str(trained), "--prompts_file", str(prompts),
                        "--temperature", "0", "--max_new_tokens", "10", "--json"], LLAMA)
    rows = [json.loads(line) for line in batch.stdout.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["ROMEO:", "JULIET:", "To be"]
    assert rows[0]["completion"] == record["completion"][:len(rows[0]["completion"])]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    """40 steps straight vs. killed after the step-20 checkpoint and resumed: same losses, same weights."""
    data = tmp_path / "data"
    common = ["--max_steps", "40", "--save_interval", "20", "--eval_interval", "10", "--log_interval", "1",
              "--batch_size", "8", "--seq_len_stages", "64", "--tokens_per_step", "2048"]
    straight = tmp_path / "straight"
    run_script(tiny_train_args(straight, data, *common), LLAMA, tmp_path)

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, *tiny_train_args(resumed, data, *common)], cwd=LLAMA,
                            env=script_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while latest_checkpoint(resumed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(resumed).name == "ckpt-0000020", "the kill came too late to test resuming"
    run_script(tiny_train_args(resumed, data, *common, "--resume"), LLAMA, tmp_path)

    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.get("loss") == rb.get("loss") and ra.get("val_loss") == rb.get("val_loss"), (ra, rb)
    wa = load_file(str(straight / "ckpt-0000040" / "model.safetensors"))
    wb = load_file(str(resumed / "ckpt-0000040" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_during_checkpointing_never_leaves_a_loadable_partial(tmp_path):
    """SIGKILL at arbitrary moments of a run that saves every step: whatever --resume would pick loads."""
    data = tmp_path / "data"
    out = tmp_path / "out"
    args = tiny_train_args(out, data, "--max_steps", "200", "--save_interval", "1", "--keep_last", "2")
    run_script(tiny_train_args(tmp_path / "warm", data, "--max_steps", "1"), LLAMA, tmp_path)  # cache the data
    for delay in (0.05, 0.13, 0.29):  # kill at varying points of the save-every-step cycle
        before = latest_checkpoint(out)
        proc = subprocess.Popen([sys.executable, *args, *(["--resume"] if before else [])],
                                cwd=LLAMA, env=script_env(tmp_path), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while latest_checkpoint(out) == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for ckpt in list_checkpoints(out):
            load_checkpoint(str(ckpt))
            load_trainer_state(ckpt)
    assert latest_checkpoint(out) is not None
    # a half-written save is only ever a hidden temp folder, and a folder missing files is skipped
    partial = out / "ckpt-9999999"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    assert latest_checkpoint(out) != partial


def test_sigterm_saves_a_checkpoint_and_exits_with_the_signal(tmp_path):
    data = tmp_path / "data"
    out = tmp_path / "out"
    run_script(tiny_train_args(tmp_path / "warm", data, "--max_steps", "1"), LLAMA, tmp_path)
    proc = subprocess.Popen([sys.executable, *tiny_train_args(out, data, "--max_steps", "100000",
                                                              "--save_interval", "100000")],
                            cwd=LLAMA, env=script_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(metrics(out)) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, output  # as the shell reports a process that SIGTERM ended
    assert "stopped by SIGTERM" in output and "done:" not in output
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and 0 < load_trainer_state(ckpt)["step"] < 100000


def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun with 2 gloo processes x batch 4 == 1 process x batch 8, step for step."""
    data = tmp_path / "data"
    common = ["--max_steps", "12", "--log_interval", "1", "--eval_interval", "6", "--save_interval", "12"]
    single = tmp_path / "single"
    run_script(tiny_train_args(single, data, *common, "--batch_size", "8"), LLAMA, tmp_path)
    ddp = tmp_path / "ddp"
    run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                *tiny_train_args(ddp, data, *common, "--batch_size", "4")], LLAMA, tmp_path)
    a, b = metrics(single), metrics(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-4), (key, ra, rb)
    wa = load_file(str(single / "ckpt-0000012" / "model.safetensors"))
    wb = load_file(str(ddp / "ckpt-0000012" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)
    assert len(load_trainer_state(ddp / "ckpt-0000012")["rng"]) == 2  # every rank's RNG state


def test_progressive_sequence_length_keeps_tokens_per_step(tmp_path):
    out = tmp_path / "out"
    run_script(tiny_train_args(out, tmp_path / "data", "--max_steps", "30", "--log_interval", "1",
                               "--seq_len_stages", "32,64"), LLAMA, tmp_path)
    records = [r for r in metrics(out) if "loss" in r]
    assert [r["seq_len"] for r in records] == [32] * 10 + [64] * 10 + [128] * 10
    assert len({r["tokens"] - p["tokens"] for p, r in zip(records, records[1:])}) == 1


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_inputs_give_one_line_errors(trained, tmp_path):
    one_line_error(run_script(["trainer.py", "--n_layerz", "2"], LLAMA, check=False), "--n_layerz")
    one_line_error(run_script(["trainer.py", "--lr", "fast"], LLAMA, check=False), "--lr")
    one_line_error(run_script(["trainer.py", "--n_kv_heads", "5"], LLAMA, check=False), "n_kv_heads")
    one_line_error(run_script(["trainer.py", "--out_dir", str(tmp_path / "nothing"), "--resume"], LLAMA,
                              check=False), "--resume")
    one_line_error(run_script(["inference.py", "--checkpoint", str(tmp_path / "missing")], LLAMA, check=False),
                   "not found")
    one_line_error(run_script(["inference.py", "--checkpoint", str(trained), "--prompt", ""], LLAMA, check=False),
                   "prompt is empty")
    one_line_error(run_script(["inference.py", "--checkpoint", str(tmp_path)], LLAMA, check=False),
                   "not a SmolHub checkpoint")
    one_line_error(run_script(["inference.py", "--checkpoint", str(trained), "--device", "cpu", "--compile"], LLAMA,
                              check=False), "--compile")
    one_line_error(run_script(tiny_train_args(tmp_path / "graphs", tmp_path / "data", "--cuda_graphs", "true"), LLAMA,
                              check=False), "--cuda_graphs true needs a CUDA device")


def test_samples_during_a_mixed_precision_run(tmp_path):
    """The periodic samples of a bf16-autocast run (as every GPU run is) come at their interval and the
    run goes on. (On a GPU the sample's bf16 keys/values meet the CUDA-graph decoder's cache:
    test_layers.py's cache-dtype test covers that path; the CPU decodes another way.)"""
    out = tmp_path / "out"
    proc = run_script(tiny_train_args(out, tmp_path / "data", "--dtype", "bfloat16", "--max_steps", "4",
                                      "--sample_interval", "2", "--eval_interval", "4", "--eval_batches", "2"),
                      LLAMA, tmp_path)
    samples = [line for line in proc.stdout.splitlines() if " sample: " in line]
    assert [line.split(" sample: ")[0] for line in samples] == ["step 2", "step 4"], proc.stdout[-2000:]
    assert all(len(line.split(" sample: ")[1]) > len("Once upon a time") for line in samples)
    assert metrics(out)[-1]["step"] == 4


def test_cuda_graphs_only_where_they_are_safe():
    """auto turns CUDA graphs on for one compiled CUDA process at one micro-batch per step and off
    elsewhere (gradient accumulation under CUDA graphs corrupts the gradients); true where they can't
    run is an error naming every blocker, false always wins."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    one_gpu, two_gpus, on_cpu = Runtime(0, 0, 1, cuda), Runtime(0, 0, 2, cuda), Runtime(0, 0, 1, cpu)
    auto, on, off = (TrainConfig(cuda_graphs=v) for v in ("auto", "true", "false"))
    assert use_cuda_graphs(auto, one_gpu, True, 1) and use_cuda_graphs(on, one_gpu, True, 1)
    assert not use_cuda_graphs(off, one_gpu, True, 1)
    for rt, compiled, accum in [(on_cpu, True, 1), (one_gpu, False, 1), (two_gpus, True, 1), (one_gpu, True, 4)]:
        assert not use_cuda_graphs(auto, rt, compiled, accum)
    with pytest.raises(UserError, match="a CUDA device, --compile, one process .*one micro-batch per step "
                                        r"\(this run has 4"):
        use_cuda_graphs(on, Runtime(0, 0, 2, cpu), False, 4)


def test_corrupt_checkpoint_is_refused_and_left_alone(trained, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt-0000300"
    shutil.copytree(latest_checkpoint(trained), ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = weights.read_bytes()
    one_line_error(run_script(["inference.py", "--checkpoint", str(ckpt)], LLAMA, check=False), "cannot be loaded")
    assert weights.read_bytes() == before
    (ckpt / "config.json").write_text("{broken")
    one_line_error(run_script(["inference.py", "--checkpoint", str(ckpt)], LLAMA, check=False), "corrupt")


def test_unreachable_hub_dataset_fails_fast_with_the_fix(tmp_path):
    start = time.time()
    proc = run_script(["trainer.py", "--preset", "tiny", "--dataset", "tinystories", "--data_dir",
                       str(tmp_path / "d"), "--out_dir", str(tmp_path / "o")], LLAMA, check=False)
    assert time.time() - start < 30 + 15  # 30 s for the Hub, the rest is starting Python and torch
    one_line_error(proc, "--dataset")
    assert not (tmp_path / "o").exists()


def test_trainer_runs_as_a_module_from_the_repo_root(tmp_path):
    proc = run_script(["-m", "StoryLlama.trainer", *tiny_train_args(tmp_path / "o", tmp_path / "d",
                                                                     "--max_steps", "2")[1:]], REPO, tmp_path)
    assert "done: step 2" in proc.stdout


def test_wandb_online_without_a_key_falls_back_to_offline(tmp_path):
    env = script_env(tmp_path)
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        env.pop(key, None)
    env["HOME"] = str(tmp_path)  # no ~/.netrc with a wandb key
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, *tiny_train_args(out, tmp_path / "data", "--max_steps", "3",
                                                            "--wandb_mode", "online")],
                          cwd=LLAMA, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logging offline" in proc.stdout + proc.stderr
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (out / "wandb_run_id").read_text() in runs[0].name
