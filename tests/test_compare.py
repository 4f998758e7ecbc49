"""`python -m smolhub.compare`: a tiny two-arm, two-seed study on CPU, its budgets, its resume after a
kill, and the statistics of its report."""
import dataclasses
import fcntl
import json
import math
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import GPT2_DIR, REPO, SHAKESPEARE, script_env
from smolhub.checkpoint import read_config
from smolhub.compare import load_study, plan
from smolhub.compare.stats import regularized_beta, student_t_two_sided, welch_p
from smolhub.config import TrainConfig
from smolhub.errors import UserError
from smolhub.modeling import model_class

STEPS = 40
FLAGS = {"preset": "tiny", "deterministic": True, "sample_interval": 0, "eval_interval": 20, "save_interval": 20,
         "log_interval": 10}
ARMS = [{"name": "llama", "model": "StoryLlama"}, {"name": "gpt", "model": "SmolTransformer"}]


def write_spec(folder: Path, data_dir: Path, **changes) -> Path:
    """A study of StoryLlama against SmolTransformer (tiny presets) for STEPS steps of 2048 tokens."""
    spec = {"dataset": str(SHAKESPEARE), "budget": {"tokens": STEPS * 2048}, "seeds": [1, 2],
            "out_dir": str(folder / "study"), "data_dir": str(data_dir), "flags": FLAGS, "arms": ARMS, **changes}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.yaml").write_text(yaml.safe_dump(spec))
    return folder / "study.yaml"


def compare(spec: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smolhub.compare", str(spec), *flags], cwd=spec.parent,
                            env=script_env(spec.parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def study(tmp_path_factory, data_dir) -> tuple[Path, str]:
    """The study run once, uninterrupted: (its out_dir, the command's output)."""
    spec = write_spec(tmp_path_factory.mktemp("whole"), data_dir)
    return spec.parent / "study", finish(compare(spec))


def test_study_report_holds_the_runs_numbers(study):
    out, log = study
    report = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in report["arms"]] == ["llama", "gpt"] and report["budget"] == {"tokens": STEPS * 2048}
    for arm in report["arms"]:
        assert [r["seed"] for r in arm["runs"]] == [1, 2]
        for run in arm["runs"]:
            folder = out / arm["name"] / f"seed-{run['seed']}"
            assert run["out_dir"] == str(folder) and (folder / f"ckpt-{STEPS:07d}").is_dir()
            logged = records(folder)
            evaluated = [r for r in logged if "val_bpb" in r]
            assert run["val_bpb"] == evaluated[-1]["val_bpb"] and evaluated[-1]["step"] == STEPS
            assert [p["val_bpb"] for p in run["curve"]] == [r["val_bpb"] for r in evaluated]
            assert run["steps"] == STEPS and run["tokens"] == logged[-1]["tokens"] == STEPS * 2048
            assert run["flops"] == arm["flops_per_token"] * run["tokens"]
            meta = read_config(folder / f"ckpt-{STEPS:07d}")["meta"]
            assert (run["params"], run["active_params"]) == (meta["params"], meta["active_params"])
            assert run["train_seconds"] == logged[-1]["seconds"] > 0
            assert [p["seconds"] for p in run["curve"]] == [r["seconds"] for r in evaluated]
            assert run["peak_mem_gib"] is None  # not measured on CPU
        bpb = [r["val_bpb"] for r in arm["runs"]]
        assert arm["val_bpb"] == {"mean": statistics.fmean(bpb), "std": statistics.stdev(bpb), "n": 2}
    first = [r["val_bpb"] for r in report["arms"][0]["runs"]]
    assert report["arms"][0]["p_vs_first"] is None
    assert report["arms"][1]["p_vs_first"] == welch_p(first, [r["val_bpb"] for r in report["arms"][1]["runs"]])
    md = (out / "report.md").read_text()
    gpt = report["arms"][1]
    assert f"| gpt | SmolTransformer | {gpt['params'] / 1e6:.2f}M" in md
    assert f"{gpt['val_bpb']['mean']:.4f} ± {gpt['val_bpb']['std']:.4f} (n=2) | {gpt['p_vs_first']:.3g} |" in md
    assert "Peak memory: none logged" in md
    for axis in ("tokens", "flops", "seconds"):
        assert (out / f"bpb_vs_{axis}.png").stat().st_size > 5000 and f"bpb_vs_{axis}.png" in md
    # the same seed gives every arm the same data order
    assert log.count("--seed 1 ") == 2 and log.count("--seed 2 ") == 2


def test_equal_flops_gives_steps_in_inverse_proportion_to_flops_per_token(study, data_dir, tmp_path, capsys):
    """The FLOPs per token are the trainer's model's (a checkpoint of the study rebuilt); the steps
    are the budget over FLOPs per step, rounded down."""
    out, _ = study
    budget = 5e11
    arms = [*ARMS, {"name": "deep", "model": "StoryLlama", "flags": {"n_layer": 4}}]
    spec = write_spec(tmp_path, data_dir, budget={"flops": budget}, arms=arms)
    plans = plan(load_study(str(spec)))
    for p, arm in zip(plans[:2], ["llama", "gpt"]):
        config = read_config(out / arm / "seed-1" / f"ckpt-{STEPS:07d}")
        cls = model_class(config["architecture"])
        assert p.flops_per_token == cls(cls.config_class.from_dict(config["model"])).flops_per_token(128)
    per_token = [p.flops_per_token for p in plans]
    assert len(set(per_token)) == 3 and all(p.tokens_per_step == 2048 for p in plans)
    assert [p.max_steps for p in plans] == [int(budget // (f * 2048)) for f in per_token]
    for p in plans:  # steps x FLOPs per token is the same for every arm, up to the rounding of one step
        assert budget - p.flops_per_token * 2048 < p.max_steps * p.flops_per_token * 2048 <= budget
    from smolhub.compare import main

    assert main([str(spec), "--dry_run"]) is None
    assert f"deep: StoryLlama, {plans[2].max_steps:,} steps x 2,048 tokens" in capsys.readouterr().out
    assert not (tmp_path / "study").exists()


def folder_is_free(run: Path) -> bool:
    with open(run / ".lock") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_stopped_study_resumes_to_the_same_report(study, data_dir, tmp_path, stop):
    """Stop the study while its second run trains, by SIGKILL (the trainer saves on its parent's death)
    or by a SIGTERM or SIGINT to the study alone (it passes the signal on and exits only once the trainer
    has saved): run again, it keeps the finished run, continues the interrupted one with --resume, and
    reports what the uninterrupted study reported."""
    spec = write_spec(tmp_path, data_dir)
    out = tmp_path / "study"
    proc = compare(spec)
    second = out / "gpt" / "seed-1"
    deadline = time.time() + 300
    while not ((second / "metrics.jsonl").exists() and any(r["step"] >= 10 for r in records(second))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(stop)
    output = proc.communicate()[0]
    if stop != signal.SIGKILL:
        assert proc.returncode == 128 + stop and f"interrupted by {stop.name}" in output, output[-3000:]
        assert folder_is_free(second) and any(second.glob("ckpt-*")), output[-3000:]
    while not folder_is_free(second):
        assert time.time() < deadline
        time.sleep(0.1)
    assert not (out / "report.json").exists()
    finished_ckpt = out / "llama" / "seed-1" / f"ckpt-{STEPS:07d}"
    saved_at = finished_ckpt.stat().st_mtime_ns
    log = finish(compare(spec))
    assert "llama seed 1: finished" in log and finished_ckpt.stat().st_mtime_ns == saved_at
    assert f"--out_dir {second} --resume" in log and "resuming" in log
    whole = json.loads((study[0] / "report.json").read_text())
    resumed = json.loads((out / "report.json").read_text())
    for a, b in zip(whole["arms"], resumed["arms"]):
        assert a["val_bpb"] == b["val_bpb"] and a["p_vs_first"] == b["p_vs_first"]
        for x, y in zip(a["runs"], b["runs"]):
            assert [(p["step"], p["tokens"], p["flops"], p["val_bpb"]) for p in x["curve"]] == \
                [(p["step"], p["tokens"], p["flops"], p["val_bpb"]) for p in y["curve"]], (x["out_dir"], log[-3000:])
            assert {k: x[k] for k in ("steps", "tokens", "flops", "params", "active_params", "val_loss")} == \
                {k: y[k] for k in ("steps", "tokens", "flops", "params", "active_params", "val_loss")}


def test_equal_seconds_plan_keeps_each_arms_horizon(data_dir, tmp_path):
    spec = write_spec(tmp_path, data_dir, budget={"seconds": 90}, arms=[
        {"name": "short", "model": "StoryLlama"}, {"name": "long", "model": "StoryLlama", "flags": {"max_steps": 500}}])
    assert [(p.max_seconds, p.max_steps) for p in plan(load_study(str(spec)))] == [(90.0, 200), (90.0, 500)]


@pytest.mark.skipif("max_seconds" not in TrainConfig.__dataclass_fields__,
                    reason="equal wall-clock budgets need the trainer's --max_seconds (TrainConfig.max_seconds)")
def test_equal_seconds_stops_every_arm_at_the_time_budget(data_dir, tmp_path):
    spec = write_spec(tmp_path, data_dir, budget={"seconds": 2}, seeds=[1], flags={**FLAGS, "max_steps": 100000})
    finish(compare(spec))
    report = json.loads((tmp_path / "study" / "report.json").read_text())
    for arm in report["arms"]:
        (run,) = arm["runs"]
        assert 2 <= run["train_seconds"] < 5 and 0 < run["steps"] < 100000
        assert run["val_bpb"] == [r for r in records(Path(run["out_dir"])) if "val_bpb" in r][-1]["val_bpb"]
    assert finish(compare(spec)).count("finished in") == 2  # a rerun trains nothing more


def test_spec_mistakes_are_one_clear_line(tmp_path, data_dir):
    bad = {"budget": ({"steps": 10}, "budget must be"), "seeds": ([1, 1], "distinct integers"),
           "arms": ([{"name": "a", "model": "StoryLlama"}] * 2, "arm names must differ"),
           "epochs": (3, "unknown keys ['epochs']")}
    for key, (value, message) in bad.items():
        with pytest.raises(UserError, match=re.escape(message)):
            load_study(str(write_spec(tmp_path, data_dir, **{key: value})))
    owned = write_spec(tmp_path, data_dir, arms=[{"name": "a", "model": "StoryLlama", "flags": ["--max_steps", "9"]}])
    with pytest.raises(UserError, match="arm a: --max_steps is set by the study"):
        plan(load_study(str(owned)))


def test_welch_p_value_matches_known_values():
    # reference values from scipy.stats (ttest_ind with equal_var=False, and t.sf)
    assert student_t_two_sided(2.0, 10) == pytest.approx(0.07338803477074037, rel=1e-10)
    assert student_t_two_sided(12.7062047, 1) == pytest.approx(0.05, rel=1e-7)
    assert student_t_two_sided(0.5, 3.7) == pytest.approx(0.6453356333199318, rel=1e-10)
    assert student_t_two_sided(40, 2.5) == pytest.approx(0.0001419563429049338, rel=1e-8)
    assert welch_p([3.1, 3.3, 3.2], [3.6, 3.5, 3.9, 3.7]) == pytest.approx(0.006252864197051633, rel=1e-9)
    assert welch_p([1.012, 1.034], [1.101, 1.087]) == pytest.approx(0.045435904660478914, rel=1e-9)
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    assert welch_p(a1, a2) == pytest.approx(0.021378001462866992, rel=1e-9)  # Welch's test on Wikipedia
    assert welch_p(a1, a1) == pytest.approx(1.0) and welch_p([1.0], a2) is None
    assert regularized_beta(3.0, 3.0, 0.5) == pytest.approx(0.5, rel=1e-12)
    assert regularized_beta(2.0, 1.0, 0.3) == pytest.approx(0.09, rel=1e-12)  # I_x(2, 1) = x^2
    assert math.isclose(regularized_beta(0.5, 0.5, 0.25), 1 / 3, rel_tol=1e-12)  # 2/pi asin(sqrt x)


@pytest.mark.parametrize("spec", sorted(p.name for p in (REPO / "benchmarks/studies").glob("*.yaml")))
def test_every_committed_study_plans(spec, tmp_path):
    """The studies the READMEs tell users to run parse, and each arm's flags are ones its trainer takes
    (planned on Tiny Shakespeare, where an arm's own BPE tokenizer trains in seconds, not on the books)."""
    study = dataclasses.replace(load_study(str(REPO / "benchmarks/studies" / spec)), dataset=str(SHAKESPEARE),
                                data_dir=str(tmp_path))
    plans = plan(study)
    assert len(plans) >= 2 and all(p.max_steps > 0 and p.tokens_per_step > 0 for p in plans)


def test_relative_tokenizer_and_config_flags_are_taken_from_where_the_study_runs(tmp_path, monkeypatch):
    """Each trainer runs in its model folder, so a relative --tokenizer or --config in the spec's flags
    reaches it resolved against the folder the study command runs in, as the dataset does."""
    (tmp_path / "gpt2").symlink_to(GPT2_DIR)
    (tmp_path / "run.yaml").write_text("lr: 0.002\n")
    spec = write_spec(tmp_path, tmp_path / "data", flags={**FLAGS, "config": "run.yaml"},
                      arms=[{"name": "llama", "model": "StoryLlama", "flags": {"tokenizer": "gpt2"}}, ARMS[1]])
    monkeypatch.chdir(tmp_path)
    study = load_study(spec.name)
    assert study.flags[study.flags.index("--config") + 1] == str(tmp_path / "run.yaml")
    llama = study.arms[0].flags
    assert llama[llama.index("--tokenizer") + 1] == str(GPT2_DIR.resolve())
    assert "--tokenizer" not in study.arms[1].flags


def test_default_runs_table_reads_each_arms_steady_rate(study, capsys):
    """benchmarks.default_runs on a finished study: each arm's plan from the report, its rate the median
    of its logged windows after the first two, its whole-run time the plan's tokens at that rate."""
    from benchmarks import default_runs

    out, _ = study
    rows = default_runs.main([str(out)])
    printed = capsys.readouterr().out
    assert [r["model"] for r in rows] == ["llama", "gpt"]
    for row in rows:
        windows = [r for r in records(out / row["model"] / "seed-1") if "tok_per_s" in r]
        assert len(windows) == STEPS // 10
        assert row["tok_per_s"] == statistics.median(r["tok_per_s"] for r in windows[2:])
        assert (row["tokens_per_step"], row["steps"], row["reached_step"]) == (2048, STEPS, STEPS)
        assert math.isclose(row["seconds"], STEPS * 2048 / row["tok_per_s"])
        assert row["val_step"] == STEPS and row["val_bpb"] == records(out / row["model"] / "seed-1")[-1]["val_bpb"]
        assert f"| {row['model']} | 2,048 | {STEPS} |" in printed


def test_default_runs_without_a_report_is_one_line(tmp_path, capsys):
    from benchmarks import default_runs

    with pytest.raises(SystemExit) as stop:
        default_runs.main([str(tmp_path)])
    assert stop.value.code == 2 and "has no report.json" in capsys.readouterr().err
