"""Shared fixtures: paths to ../shared data, and running SmolHub's scripts as a user would."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
GPT2_DIR = SHARED_DATA / "gpt2"


def script_env(tmp_path: Path | None = None) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if tmp_path is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    return env


def run_script(args: list[str], cwd: Path, tmp_path: Path | None = None, timeout: int = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `python <args>` in cwd like a user would; fail the test with the output on a crash."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=script_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def assert_tensor_position_decoding_matches(model, vocab_size: int, tol: float = 1e-9) -> None:
    """The CUDA-graph decode path (a whole-context cache, positions as tensors) run eagerly must give
    the full forward's logits. `model` is a float64 model in eval mode."""
    import torch

    idx = torch.randint(0, vocab_size, (2, 30))
    full, _ = model(idx)
    cache = model.make_kv_cache(2, model.config.block_size, "cpu", torch.float64)
    for layer in cache:  # what an earlier generation left behind must stay masked
        for buffer in vars(layer).values():
            if isinstance(buffer, torch.Tensor) and buffer.is_floating_point():
                buffer.normal_()
    logits = [model(idx[:, :10], kv_cache=cache, start_pos=0)[0]]
    for t in range(10, 30):
        logits.append(model(idx[:, t:t + 1], kv_cache=cache, start_pos=torch.tensor(t))[0])
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=tol, atol=tol)


def tiny_train_args(out_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    """A tiny StoryLlama run on the shared Shakespeare text with a 512-token BPE, deterministic."""
    return ["trainer.py", "--preset", "tiny", "--dataset", str(SHAKESPEARE), "--data_dir", str(data_dir),
            "--out_dir", str(out_dir), "--deterministic", "--sample_interval", "0", *extra]
