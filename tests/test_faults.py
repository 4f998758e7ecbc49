"""The trainer under mistakes and faults: runs that would mix or destroy other runs, a second
trainer, corrupt or half-written checkpoints, a full disk, an unwritable folder, a loss gone nan,
and signals in every phase. Each ends in one clear line with nothing already saved lost."""
import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import GPT2_DIR, REPO, SHAKESPEARE, run_script, script_env, tiny_model, tiny_train_args
from smolhub.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from smolhub.config import TrainConfig
from smolhub.errors import UserError
from smolhub.tokenizer import gpt2_tokenizer
from smolhub.train import train
from StoryLlama.config import PRESETS, StoryLlamaConfig
from StoryLlama.model import StoryLlama

LLAMA = REPO / "StoryLlama"
GUTENBERG = REPO.parent / "shared" / "data" / "gutenberg"


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    short = ["--max_steps", "20", "--save_interval", "10", "--eval_interval", "10"]
    run_script(tiny_train_args(out, data, *short), LLAMA, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = run_script(tiny_train_args(out, data, *short), LLAMA, tmp_path, check=False)
    one_line_error(proc, str(out), "--resume", "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    refused = run_script(tiny_train_args(out, data, *short, "--overwrite", "--init_from", str(out / "ckpt-0000020"),
                                         "--n_layer", "3"), LLAMA, tmp_path, check=False)
    one_line_error(refused, "--n_layer")  # refused before --overwrite deleted anything
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    run_script(tiny_train_args(out, data, "--max_steps", "12", "--save_interval", "6", "--eval_interval", "6",
                               "--overwrite"), LLAMA, tmp_path)
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-0000006", "ckpt-0000012"]
    assert steps_logged(out)[-1] == 12 and 20 not in steps_logged(out)


def test_pruning_keeps_to_the_checkpoints_of_its_own_run(tmp_path):
    model, tokenizer = tiny_model("StoryLlama"), gpt2_tokenizer(str(GPT2_DIR))
    for step in (30, 40, 60):
        save_checkpoint(tmp_path, step, model, tokenizer, {"step": step, "run_id": "old"}, {"step": step})
    for step in (10, 20):
        save_checkpoint(tmp_path, step, model, tokenizer, {"step": step, "run_id": "new"}, {"step": step},
                        keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-0000020", "ckpt-0000030", "ckpt-0000040", "ckpt-0000060"]


def test_a_second_trainer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    run_script(tiny_train_args(tmp_path / "warm", data, "--max_steps", "1"), LLAMA, tmp_path)
    first = subprocess.Popen([sys.executable, *tiny_train_args(out, data, "--max_steps", "100000",
                                                               "--save_interval", "20")],
                             cwd=LLAMA, env=script_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(out):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.1)
        for extra in ([], ["--resume"]):
            proc = run_script(tiny_train_args(out, data, "--max_steps", "100000", *extra), LLAMA, tmp_path,
                              check=False)
            one_line_error(proc, "another trainer", str(first.pid))
    finally:
        first.kill()
        first.wait()
    run_script(tiny_train_args(out, data, "--max_steps", "2", "--overwrite"), LLAMA, tmp_path)  # the lock went with it


def test_resume_falls_back_to_the_newest_loadable_checkpoint(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    common = ["--max_steps", "30", "--save_interval", "10", "--eval_interval", "10"]
    run_script(tiny_train_args(out, data, *common), LLAMA, tmp_path)
    weights = out / "ckpt-0000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    (out / ".tmp-ckpt-0000040-999").mkdir()  # what a SIGKILL during a save leaves
    (out / ".tmp-ckpt-0000040-999" / "model.safetensors").write_bytes(b"\0" * 1000)
    (out / "loss_curve.tmp.png").write_bytes(b"partial")
    proc = run_script(tiny_train_args(out, data, *common, "--resume"), LLAMA, tmp_path)
    assert "ckpt-0000030" in proc.stdout + proc.stderr and "resuming" in proc.stdout + proc.stderr
    assert "resuming " + str(out / "ckpt-0000020") in proc.stdout + proc.stderr
    assert names(out) == [".lock", "ckpt-0000010", "ckpt-0000020", "ckpt-0000030", "ckpt-0000030.corrupt",
                          "loss_curve.png", "metrics.jsonl", "run.json"]
    load_checkpoint(str(out / "ckpt-0000030"))


def test_resume_can_name_a_checkpoint(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    run_script(tiny_train_args(out, data, "--max_steps", "20", "--save_interval", "10"), LLAMA, tmp_path)
    branch = tmp_path / "branch"
    proc = run_script(tiny_train_args(branch, data, "--max_steps", "20", "--resume", str(out / "ckpt-0000010")),
                      LLAMA, tmp_path)
    assert f"resuming {out / 'ckpt-0000010'} at step 10" in proc.stdout + proc.stderr
    straight, branched = (json.loads((d / "ckpt-0000020" / "config.json").read_text())["meta"] for d in (out, branch))
    assert branched["val_loss"] == straight["val_loss"] and branched["run_id"] == straight["run_id"]
    refused = run_script(tiny_train_args(out, data, "--max_steps", "20", "--resume", str(out / "ckpt-0000010")),
                         LLAMA, tmp_path, check=False)
    one_line_error(refused, "ckpt-0000020")


def test_an_unwritable_out_dir_is_one_line(tmp_path):
    proc = run_script(tiny_train_args(Path("/sys/smolhub-out"), tmp_path / "data", "--max_steps", "2"), LLAMA,
                      tmp_path, check=False)
    one_line_error(proc, "cannot write to /sys/smolhub-out")


def tiny_config(tmp_path: Path, **extra) -> tuple[StoryLlamaConfig, TrainConfig]:
    fields = {**PRESETS["tiny"], "dataset": str(SHAKESPEARE), "data_dir": str(tmp_path / "data"),
              "out_dir": str(tmp_path / "out"), "deterministic": True, "sample_interval": 0, "max_steps": 20,
              "save_interval": 10, "eval_interval": 10, "eval_batches": 2, **extra}
    model_fields = {f: fields.pop(f) for f in list(fields) if f in StoryLlamaConfig.__dataclass_fields__}
    return StoryLlamaConfig(**model_fields), TrainConfig(**fields)


def test_a_full_disk_keeps_the_previous_checkpoint_and_resume_needs_no_cleanup(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    real_save = torch.save
    calls = []

    def disk_fills_on_the_second_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            with open(f, "wb") as partial:
                partial.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr("smolhub.checkpoint.torch.save", disk_fills_on_the_second_save)
    with pytest.raises(UserError, match="no space left on the device.*ckpt-0000010 is intact"):
        train(StoryLlama, *tiny_config(tmp_path))
    out = tmp_path / "out"
    assert names(out) == [".lock", "ckpt-0000010", "loss_curve.png", "metrics.jsonl", "run.json"]
    monkeypatch.setattr("smolhub.checkpoint.torch.save", real_save)
    result = train(StoryLlama, *tiny_config(tmp_path, resume="latest"))
    assert result["step"] == 20 and [p.name for p in list_checkpoints(out)] == ["ckpt-0000010", "ckpt-0000020"]


@pytest.mark.parametrize("save_interval", [1, 1000])  # weights caught at a save / the loss caught at a log
def test_a_non_finite_loss_stops_the_run_and_is_never_saved(tmp_path, save_interval):
    out = tmp_path / "out"
    proc = run_script(tiny_train_args(out, tmp_path / "data", "--lr", "1000", "--min_lr", "1", "--warmup_steps", "5",
                                      "--max_steps", "40", "--log_interval", "1", "--save_interval",
                                      str(save_interval)), LLAMA, tmp_path, check=False)
    line = one_line_error(proc, "became nan or inf at step", "--lr")
    saved = list_checkpoints(out)
    assert (f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved") in line
    for ckpt in saved:
        assert all(torch.isfinite(p).all() for p in load_checkpoint(str(ckpt)).model.parameters())
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses)))  # nothing non-finite was logged as training


@pytest.mark.skipif(not GUTENBERG.is_dir(), reason="needs ../shared/data/gutenberg")
def test_ctrl_c_while_training_the_tokenizer_stops_and_caches_nothing(tmp_path):
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "trainer.py", "--preset", "tiny", "--dataset", str(GUTENBERG),
                             "--data_dir", str(data), "--out_dir", str(tmp_path / "out"), "--max_steps", "5"],
                            cwd=LLAMA, env=script_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"training BPE" not in seen:
        chunk = proc.stderr.read1(4096)
        assert chunk, seen[-2000:]
        seen += chunk
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, (seen + rest)[-2000:]
    assert not list(data.glob("bpe-*")) and not (tmp_path / "out").exists()
