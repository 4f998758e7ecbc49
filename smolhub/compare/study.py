"""A study's spec, each arm's plan under the budget, and training each arm x seed through the arm's
own trainer.py (see smolhub/compare/__init__.py for the spec)."""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from smolhub.checkpoint import latest_checkpoint, read_meta
from smolhub.config import AUTO_BATCH
from smolhub.data import training_tokenizer
from smolhub.errors import UserError
from smolhub.modeling import model_class
from smolhub.plan import sequences_per_process
from smolhub.runtime import Interrupted
from smolhub.train import build_model, grad_accum_steps, parse_train_flags

BUDGETS = ("tokens", "flops", "seconds")
REQUIRED_KEYS = ("arms", "dataset", "budget", "seeds", "out_dir")
OPTIONAL_KEYS = ("flags", "tokenizer", "val_dataset", "val_fraction", "data_dir", "nproc_per_node", "tasks",
                 "eval_flags")
# Flags whose value is a local path: read relative to where the study runs, like the spec's dataset, while
# each trainer runs in its model folder, so they are passed on resolved.
PATH_FLAGS = frozenset({"--tokenizer", "--config"})
# TrainConfig fields the study sets for every run alike: an arm's flags may not set them.
STUDY_FIELDS = frozenset({"dataset", "val_dataset", "val_fraction", "data_dir", "seed", "max_steps", "max_seconds",
                          "out_dir", "resume", "overwrite", "init_from"})


@dataclass
class Arm:
    name: str
    model: str
    flags: list[str]


@dataclass
class Study:
    arms: list[Arm]
    dataset: str
    budget: tuple[str, float]  # (one of BUDGETS, amount)
    seeds: list[int]
    out_dir: Path
    flags: list[str] = field(default_factory=list)
    tokenizer: str = ""
    val_dataset: str = ""
    val_fraction: float | None = None
    data_dir: str = "data_cache"
    nproc_per_node: int = 1
    tasks: list[str] = field(default_factory=list)
    eval_flags: list[str] = field(default_factory=list)  # more flags of `python -m smolhub.eval`


@dataclass
class Plan:
    """How one arm trains under the study's budget."""
    arm: Arm
    folder: Path  # the model folder, where its trainer.py runs
    argv: list[str]  # its trainer's flags, less those of one run (seed, out_dir, ...)
    max_steps: int
    max_seconds: float
    tokens_per_step: int
    flops_per_token: float


def load_study(path: str) -> Study:
    """Read and check a study spec (YAML or JSON)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"study spec {path}: no such file")
    try:
        spec = yaml.safe_load(p.read_text())  # JSON is YAML too
    except yaml.YAMLError as e:
        raise UserError(f"study spec {path} is not valid YAML or JSON: {e}".splitlines()[0])
    if not isinstance(spec, dict):
        raise UserError(f"study spec {path} must be a mapping with the keys {', '.join(REQUIRED_KEYS)}")
    unknown, missing = sorted(set(spec) - {*REQUIRED_KEYS, *OPTIONAL_KEYS}), sorted(set(REQUIRED_KEYS) - set(spec))
    if unknown or missing:
        raise UserError(f"study spec {path}: " + "; ".join(
            ([f"unknown keys {unknown} (the optional keys: {', '.join(OPTIONAL_KEYS)})"] if unknown else [])
            + ([f"missing keys {missing}"] if missing else [])))
    budget = spec["budget"]
    kind, amount = next(iter(budget.items()), (None, None)) if isinstance(budget, dict) else (None, None)
    if kind not in BUDGETS or len(budget) != 1 or not positive_number(amount):
        raise UserError(f"budget must be {{tokens: N}}, {{flops: N}} or {{seconds: N}} with N > 0, got {budget!r}")
    seeds = spec["seeds"]
    if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds) and len(set(seeds)) == len(seeds)):
        raise UserError(f"seeds must be a list of distinct integers, got {seeds!r}")
    if not isinstance(spec["arms"], list) or not spec["arms"]:
        raise UserError("arms must be a list of {name: ..., model: ..., flags: ...}")
    arms = [load_arm(a) for a in spec["arms"]]
    if len({a.name for a in arms}) < len(arms):
        raise UserError(f"arm names must differ, got {[a.name for a in arms]}")
    tasks = spec.get("tasks", [])
    study = Study(arms=arms, dataset=resolved(str(spec["dataset"])), budget=(kind, float(amount)), seeds=seeds,
                  out_dir=Path(str(spec["out_dir"])).resolve(),
                  flags=with_paths_resolved(flag_words(spec.get("flags", []))),
                  tokenizer=resolved(str(spec.get("tokenizer", ""))),
                  val_dataset=resolved(str(spec.get("val_dataset", ""))),
                  val_fraction=spec.get("val_fraction"), data_dir=str(spec.get("data_dir", "data_cache")),
                  nproc_per_node=spec.get("nproc_per_node", 1),
                  tasks=tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks],
                  eval_flags=flag_words(spec.get("eval_flags", [])))
    if type(study.nproc_per_node) is not int or study.nproc_per_node < 1:
        raise UserError(f"nproc_per_node must be a positive integer, got {study.nproc_per_node!r}")
    if study.val_fraction is not None and not positive_number(study.val_fraction):
        raise UserError(f"val_fraction must be a number in (0, 1), got {study.val_fraction!r}")
    return study


def positive_number(value) -> bool:
    """A number > 0; YAML reads 1e17 (no dot) as text, so a numeric string counts."""
    try:
        return not isinstance(value, bool) and float(value) > 0
    except (TypeError, ValueError):
        return False


def load_arm(arm) -> Arm:
    if not (isinstance(arm, dict) and {"name", "model"} <= set(arm) <= {"name", "model", "flags"}):
        raise UserError(f"each arm is {{name: ..., model: StoryLlama, flags: {{...}}}}, got {arm!r}")
    name = str(arm["name"])
    if not name or name.startswith(".") or "/" in name:
        raise UserError(f"arm name {name!r} must be usable as a folder name")
    return Arm(name, str(arm["model"]), with_paths_resolved(flag_words(arm.get("flags", []))))


def flag_words(flags) -> list[str]:
    """A mapping {lr: 0.001, deterministic: true} or a list of command-line words -> the words."""
    if isinstance(flags, list):
        return [str(f) for f in flags]
    if not isinstance(flags, dict):
        raise UserError(f"flags must be a mapping of trainer fields to values or a list of words, got {flags!r}")
    words = []
    for name, value in flags.items():
        values = value if isinstance(value, list) else [value]
        words += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return words


def with_paths_resolved(words: list[str]) -> list[str]:
    return [resolved(w) if i and words[i - 1] in PATH_FLAGS else w for i, w in enumerate(words)]


def resolved(path: str) -> str:
    """A local path the trainer can read from its model folder; a source name (tinystories) as it is."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def plan(study: Study) -> list[Plan]:
    """Each arm's configs parsed exactly as its trainer parses them, and its steps under the budget."""
    return [plan_arm(study, arm) for arm in study.arms]


def plan_arm(study: Study, arm: Arm) -> Plan:
    cls = model_class(arm.model)

    try:
        horizon = {"max_steps"} if study.budget[0] == "seconds" else set()  # a time budget's schedule length
        owned = sorted(parse_train_flags(cls, [*study.flags, *arm.flags]).explicit & (STUDY_FIELDS - horizon))
        if owned:
            raise UserError(f"--{owned[0]} is set by the study for every arm alike: use the spec's keys "
                            "(dataset, val_dataset, val_fraction, data_dir, budget, seeds, out_dir) instead")
        argv = ["--dataset", study.dataset, "--data_dir", str(Path(study.data_dir).resolve())]
        argv += ["--tokenizer", study.tokenizer] if study.tokenizer else []
        argv += ["--val_dataset", study.val_dataset] if study.val_dataset else []
        argv += ["--val_fraction", str(study.val_fraction)] if study.val_fraction is not None else []
        argv += [*study.flags, *arm.flags]
        mcfg, cfg = parse_train_flags(cls, argv)
        tokenizer = training_tokenizer(cfg)  # trained once into data_dir, where the trainer finds it
        with torch.device("meta"):
            model = build_model(cls, mcfg, cfg, tokenizer)
        if cfg.batch_size == AUTO_BATCH:  # the trainer splits the same tokens per step into the micro-batches that fit
            cfg = dataclasses.replace(cfg, batch_size=sequences_per_process(cfg, mcfg.block_size, study.nproc_per_node))
        tokens_per_step = (grad_accum_steps(cfg, mcfg.block_size, study.nproc_per_node) * cfg.batch_size
                           * mcfg.block_size * study.nproc_per_node)
    except UserError as e:
        raise UserError(f"arm {arm.name}: {e}")
    flops_per_token = model.flops_per_token(mcfg.block_size)
    kind, amount = study.budget
    max_steps, max_seconds = cfg.max_steps, 0.0
    if kind == "seconds":
        max_seconds = float(amount)
    else:
        per_step = tokens_per_step * (flops_per_token if kind == "flops" else 1)
        max_steps = int(amount // per_step)
        if max_steps == 0:
            raise UserError(f"a budget of {amount:g} {kind} is less than one step of arm {arm.name} ({per_step:g} "
                            f"{kind}): raise it")
    folder = Path(importlib.util.find_spec(arm.model).origin).parent
    return Plan(arm, folder, argv, max_steps, max_seconds, tokens_per_step, flops_per_token)


def run_folder(study: Study, arm: Arm, seed: int) -> Path:
    return study.out_dir / arm.name / f"seed-{seed}"


def finished(out: Path, p: Plan) -> bool:
    """Whether the run in `out` has its final checkpoint: at max_steps, or where its training time
    reached the time budget."""
    last = latest_checkpoint(out)
    if last is None:
        return False
    step = read_meta(last).get("step", 0)
    return step >= p.max_steps or (p.max_seconds > 0 and any(
        r["step"] == step and r.get("seconds", 0) >= p.max_seconds for r in read_records(out)))


def read_records(out: Path) -> list[dict]:
    """The run's metrics.jsonl."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train(study: Study, p: Plan, seed: int) -> None:
    """One arm x seed through the arm's own trainer.py: new, continued with --resume, or left as it is
    when finished."""
    out = run_folder(study, p.arm, seed)
    if finished(out, p):
        print(f"{p.arm.name} seed {seed}: finished in {out}", flush=True)
        return
    argv = [*p.argv, "--seed", str(seed), "--max_steps", str(p.max_steps), "--out_dir", str(out)]
    argv += ["--max_seconds", str(p.max_seconds)] if p.max_seconds else []
    argv += ["--resume"] if latest_checkpoint(out) is not None else ["--overwrite"]  # the folder is the study's
    launch = [sys.executable, "trainer.py"] if study.nproc_per_node == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(study.nproc_per_node),
         "trainer.py"]
    print(f"{p.arm.name} seed {seed}: {' '.join(launch[1:] + argv)}", flush=True)
    study_pid = os.getpid()
    proc = subprocess.Popen(launch + argv, cwd=p.folder, preexec_fn=lambda: stop_with_parent(study_pid))
    code = wait_passing_on_stop(proc)
    if code:
        raise UserError(f"arm {p.arm.name} seed {seed}: its trainer exited {code} (its output is above); run the "
                        "study again to continue from its last checkpoint")


def wait_passing_on_stop(proc: subprocess.Popen, grace: float = 2.0) -> int:
    """The trainer's exit code. A stop signal to the study (Ctrl-C; SIGTERM from `timeout`, `kill`, a job
    scheduler) reaches the trainer too, and the study waits while it saves before stopping with the
    signal: whoever stopped the study finds the checkpoint on disk and the run folder free once the study
    has exited. A signal sent to the whole process group reached the trainer already; one sent to the
    study alone is passed on after `grace` seconds, by when a trainer that had it is saving, where a
    repeat only asks again."""
    received: list[tuple[int, float]] = []  # the first stop signal and when it came

    def remember(signum, frame):
        if not received:
            received.append((signum, time.monotonic()))

    handlers = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    passed_on = False
    try:
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if received and not passed_on and time.monotonic() - received[0][1] >= grace:
                    proc.send_signal(received[0][0])
                    passed_on = True
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if received:
        raise Interrupted(received[0][0])
    return code


def stop_with_parent(study_pid: int) -> None:
    """In the trainer's process: a study killed outright (SIGKILL) sends it SIGTERM, on which it saves and stops,
    instead of training on unwatched and holding its folder's lock against the rerun."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != study_pid:  # the study died before the line above took effect
            os.kill(os.getpid(), signal.SIGTERM)


def evaluate_tasks(study: Study, out: Path) -> list[dict]:
    """The scores of the run's final checkpoint on the study's tasks, as `python -m smolhub.eval` writes
    them into its report card ({task, metric, value, stderr} each); a card already there is reused."""
    final = latest_checkpoint(out)
    folder = out / "eval" / final.name
    if not (folder / "report_card.json").exists():
        cmd = [sys.executable, "-m", "smolhub.eval", "--checkpoint", str(final), "--tasks", ",".join(study.tasks),
               "--out", str(folder), *study.eval_flags]
        if subprocess.run(cmd).returncode:
            raise UserError(f"evaluating {final} failed (its output is above): `{' '.join(cmd[1:])}`")
    return json.loads((folder / "report_card.json").read_text())["tasks"]
