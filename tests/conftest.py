"""Shared fixtures: paths to ../shared data, tiny models of every architecture, running SmolHub's
scripts as a user would, the `cuda` marker's skip where there is no GPU, and triton's interpreter
where there is none."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in triton's interpreter, on CPU tensors (the `interpreted_triton`
# fixture). It must be on before triton is first imported: triton.language's own jit functions
# (tl.sum, tl.cdiv) are built for the mode of that moment.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


def tiny_config(architecture: str, **overrides):
    """The model fields of an architecture's `tiny` preset with a 320-token vocabulary, then overrides."""
    from smolhub.modeling import model_class

    config_cls = model_class(architecture).config_class
    preset = importlib.import_module(f"{architecture}.config").PRESETS["tiny"]
    dims = {k: v for k, v in preset.items() if k in config_cls.__dataclass_fields__}
    return config_cls(**{**dims, "vocab_size": 320, **overrides})


def tiny_model(architecture: str, **overrides):
    from smolhub.modeling import model_class

    return model_class(architecture)(tiny_config(architecture, **overrides))


@pytest.fixture
def interpreted_triton():
    """Skips unless Triton kernels run here in triton's interpreter (a CPU machine with triton >= 3.9,
    whose interpreter runs them); on a GPU the `cuda` tests run the compiled kernels instead."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run compiled here: see the cuda tests")
    pytest.importorskip("triton", minversion="3.9", reason="triton >= 3.9's interpreter runs these kernels")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny matmuls: on the two shared cores a second thread only
    adds synchronisation, 4-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_train_args(out_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    """A tiny StoryLlama run on the shared Shakespeare text with a 512-token BPE, deterministic."""
    return ["trainer.py", "--preset", "tiny", "--dataset", str(SHAKESPEARE), "--data_dir", str(data_dir),
            "--out_dir", str(out_dir), "--deterministic", "--sample_interval", "0", *extra]


def run_tiny_trainer(model: str, dataset: str, workdir: Path, run_name: str, *flags: str) -> tuple[list[dict], str]:
    """One 60-step run of a model's tiny preset through its trainer.py, as a user runs it, with an
    evaluation every 20 steps and a sample and a checkpoint every 30: (metrics records, stdout).
    The trainer runs inside the model's folder, so a file path relative to the caller's folder is
    resolved first; a source name (synthetic) passes as it is."""
    out = workdir / run_name
    if Path(dataset).is_file():
        dataset = str(Path(dataset).resolve())
    args = ["trainer.py", "--preset", "tiny", "--dataset", dataset, "--data_dir", str(workdir / f"data-{model}"),
            "--out_dir", str(out), "--max_steps", "60", "--eval_interval", "20", "--save_interval", "30",
            "--sample_interval", "30", "--log_interval", "10", *flags]
    proc = subprocess.run([sys.executable, *args], cwd=REPO / model, env=script_env(workdir / f"cache-{run_name}"),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{model} {run_name} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc.stdout


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run on a CUDA GPU (`pytest -m cuda` on the GPU machine) and skip elsewhere."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    if not torch.cuda.is_available():
        for item in cuda_items:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run with `pytest -m cuda` there)"))


# One headless Chromium for the whole session (two Playwright sync sessions cannot share a process).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    yield page
    page.close()
