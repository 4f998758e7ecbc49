"""Hub push/pull up to the network call: the upload plan, the model card, the token's secrecy, and
clear errors offline. (The Hub itself is unreachable from the test machines.)"""
import ast
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import smolhub
from conftest import script_env
from smolhub.checkpoint import resolve_checkpoint
from smolhub.errors import UserError
from smolhub.hub_download import download_checkpoint
from smolhub_hub.hub import plan_upload
from test_export import tiny_checkpoint, tiny_tokenizer

FAKE_TOKEN = "hf_fakeTOKENdoNotLeak0123456789abcdef"


def run_cli(args, tmp_path, **env):
    full = script_env(tmp_path)
    full.update(env)
    return subprocess.run([sys.executable, "-m", "smolhub_hub", *args], cwd=tmp_path, env=full,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def run_dir(tokenizer, tmp_path):
    """A run's out_dir as the trainer leaves it: a checkpoint, metrics.jsonl and the loss curve."""
    run = tmp_path / "run"
    tiny_checkpoint("StoryLlama", tokenizer, run)
    (run / "metrics.jsonl").write_text('{"step": 0, "tokens": 0, "val_loss": 5.9}\n'
                                       '{"step": 7, "tokens": 14336, "loss": 5.4321, "lr": 0.001}\n')
    (run / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return run


def test_upload_plan_and_model_card(run_dir):
    plan = plan_upload(str(run_dir), "someone/StoryLlama-tiny", prompts=("ROMEO:", "The king"), max_new_tokens=20)
    assert plan.checkpoint == run_dir / "ckpt-0000007"
    assert set(plan.files) == {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                               "loss_curve.png"}  # never trainer_state.pt unless asked for
    card = plan.card
    for expected in ["StoryLlama", "0.34M total, 0.34M active", "tinyshakespeare", "14,336", "5.2500",
                     "5.4321", "![loss curve](loss_curve.png)", "```text\nROMEO:", "```text\nThe king",
                     'load_model("someone/StoryLlama-tiny")', "--init_from someone/StoryLlama-tiny",
                     'AutoModelForCausalLM.from_pretrained("StoryLlama-hf")', "temperature 0.8, top-p 0.9, seed 0"]:
        assert expected in card, expected
    assert card.startswith("---\npipeline_tag: text-generation\n")

    again = plan_upload(str(run_dir / "ckpt-0000007"), "someone/StoryLlama-tiny", with_trainer_state=True,
                        prompts=("ROMEO:", "The king"), max_new_tokens=20)
    assert again.files["trainer_state.pt"] == run_dir / "ckpt-0000007" / "trainer_state.pt"
    assert again.card == card  # the samples are seeded


def test_plan_errors(run_dir, tmp_path):
    with pytest.raises(UserError, match="not a Hub repo id"):
        plan_upload(str(run_dir), "no-slash")
    with pytest.raises(UserError, match="not a SmolHub checkpoint"):
        plan_upload(str(tmp_path / "run" / ".."), "someone/x")
    with pytest.raises(UserError, match="not found"):
        plan_upload(str(tmp_path / "nowhere" / "x" / "y"), "someone/x")


def test_push_never_shows_the_token(run_dir, tmp_path):
    """The whole push up to the network, through `python -m smolhub_hub`, against a closed port."""
    proc = run_cli(["push", str(run_dir), "someone/StoryLlama-tiny", "--max_new_tokens", "8"], tmp_path,
                   HF_TOKEN=FAKE_TOKEN, HF_ENDPOINT="http://127.0.0.1:9")
    assert proc.returncode == 2, proc.stderr
    assert "README.md" in proc.stdout and "model.safetensors" in proc.stdout  # the plan was printed
    assert "error: cannot reach the Hugging Face Hub to push 'someone/StoryLlama-tiny'" in proc.stderr
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    assert FAKE_TOKEN[3:15] not in proc.stdout + proc.stderr
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert FAKE_TOKEN.encode() not in f.read(), name


def test_push_dry_run_prints_the_card(run_dir, capsys, monkeypatch):
    from smolhub_hub.cli import main

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    main(["push", str(run_dir), "someone/StoryLlama-tiny", "--dry_run", "--max_new_tokens", "8"])
    out = capsys.readouterr()
    assert "--- README.md ---" in out.out and "```text\nOne day, a girl named Lily" in out.out  # default prompts
    assert FAKE_TOKEN not in out.out + out.err


def test_push_without_token_says_how_to_log_in(tmp_path):
    env = {k: v for k, v in script_env(tmp_path).items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                                                                      "HF_TOKEN_PATH")}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # no stored login either
    proc = subprocess.run([sys.executable, "-m", "smolhub_hub", "push", "run", "someone/x"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no Hugging Face token: run `hf auth login` or set HF_TOKEN" in proc.stderr


def test_pull_offline_is_a_clear_error(tmp_path):
    proc = run_cli(["pull", "someone/StoryLlama", str(tmp_path / "local")], tmp_path, HF_HUB_OFFLINE="1")
    assert proc.returncode == 2
    assert "HF_HUB_OFFLINE is set for 'someone/StoryLlama'" in proc.stderr
    assert "pass a local checkpoint folder" in proc.stderr


def test_local_folder_resolves_without_the_hub_and_unknown_repo_fails_fast(run_dir):
    ckpt = run_dir / "ckpt-0000007"
    assert resolve_checkpoint(str(ckpt)) == ckpt
    assert resolve_checkpoint(str(run_dir)) == ckpt
    start = time.perf_counter()
    # blocked network here: "cannot reach"; with a network: the repo does not exist
    with pytest.raises(UserError, match="cannot reach|does not exist|HF_HUB_OFFLINE"):
        download_checkpoint("smolhub-tests-nobody/no-such-model-3f9a1c")
    assert time.perf_counter() - start < 60
    with pytest.raises(UserError, match="not a Hub repo id"):
        download_checkpoint("not a repo")


CORE_WITHOUT_HUB = textwrap.dedent("""
    import importlib, pkgutil, sys
    import smolhub
    from smolhub.checkpoint import resolve_checkpoint
    from smolhub.errors import UserError
    for module in pkgutil.walk_packages(smolhub.__path__, "smolhub."):
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as e:
            if e.name != "triton":  # the CUDA kernels' own dependency, absent on CPU installs
                raise
    try:
        resolve_checkpoint("someone/StoryLlama")  # a Hub id: the core downloads it (offline here: an error)
    except UserError as e:
        print(e)
    print(sorted(name for name in sys.modules if name.partition(".")[0] == "smolhub_hub"))
""")


def test_the_core_never_imports_the_hub_package(tmp_path):
    """smolhub_hub depends on smolhub, never the reverse: not at import, not lazily, not to download."""
    proc = subprocess.run([sys.executable, "-c", CORE_WITHOUT_HUB], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(script_env(tmp_path), HF_HUB_OFFLINE="1"), timeout=240)
    assert proc.returncode == 0, proc.stderr
    error, hub_modules = proc.stdout.splitlines()[-2:]
    assert error.startswith("HF_HUB_OFFLINE is set for 'someone/StoryLlama'"), proc.stdout
    assert hub_modules == "[]", hub_modules
    for path in Path(smolhub.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.partition(".")[0] == "smolhub_hub" for n in names), path
