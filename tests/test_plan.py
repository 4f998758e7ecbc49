"""The plan of a run: --batch_size auto's search (a fake memory budget through the real trial steps of
a tiny model), the micro-batch it gives the trainer and --resume, and the lines every run begins with."""
import json
import math
import re

import pytest
import torch
import yaml

from conftest import REPO, SHAKESPEARE, run_script, tiny_model, tiny_train_args
from smolhub.checkpoint import load_trainer_state
from smolhub.compare import load_study, plan
from smolhub.config import TrainConfig
from smolhub.errors import UserError
from smolhub.modeling import model_class
from smolhub.objectives import NextTokenPrediction
from smolhub.plan import eta_line, largest_micro_batch, plan_lines, sequences_per_process, trial_bytes
from smolhub.train import parse_train_flags

LLAMA = REPO / "StoryLlama"


@pytest.fixture(scope="module")
def measure(one_thread):
    """The bytes of a real trial step of tiny StoryLlama on the CPU, by micro-batch, and the sizes measured."""
    model = tiny_model("StoryLlama", block_size=64)
    objective = NextTokenPrediction(model)
    measured: list[int] = []

    def bytes_of(micro_batch: int) -> float:
        measured.append(micro_batch)
        return trial_bytes(model, objective, micro_batch, torch.float32)

    bytes_of.measured = measured
    bytes_of.model = model
    return bytes_of


def test_auto_picks_the_largest_micro_batch_within_the_budget(measure):
    four, eight = measure(4), measure(8)
    assert measure(1) < measure(2) < four < eight  # activations grow with the micro-batch
    measure.measured.clear()
    assert largest_micro_batch(16, (four + eight) / 2, measure) == (4, four)
    assert len(measure.measured) <= 3 and 8 in measure.measured  # a bisection over 1, 2, 4, 8, 16
    assert largest_micro_batch(16, eight, measure)[0] == 8
    assert largest_micro_batch(16, 10 * eight, measure)[0] == 16


def test_the_pick_divides_the_sequences_of_a_step(measure):
    """24 sequences per step: 5 would fit but does not divide them, so 4; with room for 7, 6."""
    assert largest_micro_batch(24, (measure(5) + measure(6)) / 2, measure)[0] == 4
    assert largest_micro_batch(24, (measure(7) + measure(8)) / 2, measure)[0] == 6
    assert largest_micro_batch(24, 10 * measure(24), measure, limit=10)[0] == 8  # the data holds 10 a batch


def test_a_trial_leaves_the_model_and_the_random_numbers_as_they_were(measure):
    model = measure.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = torch.get_rng_state()
    measure(3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None and torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_a_budget_that_fits_nothing_is_a_user_error(measure):
    with pytest.raises(UserError, match="--batch_size auto: not even one sequence per micro-batch fits in .* GiB "
                                        r"\(a trial step took .* GiB\): use --grad_checkpointing"):
        largest_micro_batch(16, measure(1) - 1, measure)


def test_auto_splits_tokens_per_step_into_sequences_per_process():
    assert sequences_per_process(TrainConfig(batch_size="auto", tokens_per_step=4096), 128, 2) == 16
    with pytest.raises(UserError, match="set --tokens_per_step .* or give --batch_size a number"):
        TrainConfig(batch_size="auto")
    with pytest.raises(UserError, match="--tokens_per_step 4000 must be a multiple of block_size x processes = "
                                        "128 x 1 = 128"):
        sequences_per_process(TrainConfig(batch_size="auto", tokens_per_step=4000), 128, 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One data cache (Shakespeare in the tiny preset's 512-token BPE) for the module's runs."""
    return tmp_path_factory.mktemp("data")


def test_trainer_auto_batch_is_recorded_and_kept_by_resume(data, tmp_path):
    """A tiny run with --batch_size auto states its pick (on this CPU, bounded by what a batch of the
    validation split holds), accumulates micro-batches up to --tokens_per_step and records the number;
    --resume with auto continues with the same one."""
    out = tmp_path / "run"
    proc = run_script(tiny_train_args(out, data, "--batch_size", "auto", "--tokens_per_step", str(88 * 128),
                                      "--max_steps", "2", "--eval_interval", "2", "--save_interval", "2",
                                      "--eval_batches", "1"), LLAMA, tmp_path)
    picked = re.search(r"--batch_size auto: (\d+) sequences per micro-batch \(peak [\d.]+ GiB in a trial step, "
                       r"within half of this machine's [\d.]+ GiB of RAM; the data holds batches of at most (\d+)\), "
                       r"(\d+) micro-batches per step", proc.stdout)
    assert picked, proc.stdout
    micro, most, accum = map(int, picked.groups())
    assert micro == max(b for b in range(1, most + 1) if 88 % b == 0) and micro * accum == 88 and accum > 1
    assert f"plan: 11,264 tokens/step ({micro} sequences x 128 tokens x {accum} micro-batches" in proc.stdout
    assert load_trainer_state(out / "ckpt-0000002")["train_config"]["batch_size"] == micro
    resumed = run_script(["trainer.py", "--out_dir", str(out), "--data_dir", str(data), "--resume", "--batch_size",
                          "auto", "--max_steps", "3", "--wandb_mode", "disabled", "--sample_interval", "0"],
                         LLAMA, tmp_path)
    assert "--batch_size auto:" not in resumed.stdout
    assert (f"({micro} sequences x 128 tokens x {accum} micro-batches x 1 process), 3 steps, resuming at step 2: "
            "33,792 tokens") in resumed.stdout
    assert load_trainer_state(out / "ckpt-0000003")["train_config"]["batch_size"] == micro


def test_plan_lines_of_a_tiny_preset_run(data, tmp_path):
    """The preset's 16 sequences win over the recipe's auto; the plan states 16 x 128 tokens a step,
    the steps, their tokens and the epochs over the prepared Shakespeare, and what would make an epoch
    of it; after the second log window, the time left."""
    stdout = run_script(tiny_train_args(tmp_path / "run", data, "--max_steps", "25", "--eval_interval", "25",
                                         "--save_interval", "25"), LLAMA, tmp_path).stdout
    (meta,) = data.glob("*/meta.json")
    train_tokens = json.loads(meta.read_text())["n_train_tokens"]
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("StoryLlama: "))
    assert lines[start + 1] == (f"plan: 2,048 tokens/step (16 sequences x 128 tokens x 1 micro-batch x 1 process), 25 "
                                f"steps: 51,200 tokens = {51_200 / train_tokens:.2f} epochs of the "
                                f"{train_tokens:,} training tokens")
    assert lines[start + 2] == (f"note: this run sees {51_200 / train_tokens:.1%} of one pass over its training data; "
                                f"--max_steps {math.ceil(train_tokens / 2048):,} makes one epoch (or prepare less with "
                                "--max_tokens)")  # 25 steps are under a tenth of Shakespeare
    assert "--batch_size auto" not in stdout
    assert re.search(r"^~[\d.]+ (s|min) to step 25 at [\d,k]+ tok/s$", stdout, re.M), stdout


@pytest.mark.parametrize("name", ["SmolTransformer", "StoryLlama", "SmolMixtral", "StoryMixtral", "StoryKimi"])
def test_readme_default_runs_table_is_each_recipe(name):
    """The README's "Default runs" row of each model is what `python trainer.py` with no flags plans:
    its data, tokens a step, steps, tokens, warmup, learning rate(s) and cosine to a tenth."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| model | data | tokens a step | steps | tokens | warmup |"):]
    row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    data, tokens_per_step, steps, tokens, warmup, lr = [cell.strip() for cell in row.split("|")[2:-1]]
    _, cfg = parse_train_flags(model_class(name), [])
    assert data.lower() == cfg.dataset
    assert (int(tokens_per_step.replace(",", "")), int(steps.replace(",", "")), int(warmup)) == \
        (cfg.tokens_per_step, cfg.max_steps, cfg.warmup_steps)
    total = cfg.tokens_per_step * cfg.max_steps
    assert tokens.split()[0] == (f"{total / 1e9:.1f}B" if total >= 1e9 else f"{total / 1e6:.0f}M")
    assert float(lr.split()[0]) == cfg.lr and cfg.min_lr == pytest.approx(cfg.lr / 10) and cfg.schedule == "cosine"
    assert ("Muon and AdamW" in lr) == (cfg.optimizer == "muon" and cfg.muon_lr in (0, cfg.lr))


def test_plan_lines_say_what_to_change_outside_a_tenth_to_twenty_epochs():
    def lines(steps: int) -> list[str]:
        return plan_lines(131_072, 32, 4, 1, 512, steps, 0, train_tokens=471_000_000)

    (plan_line,) = lines(4000)
    assert plan_line == ("plan: 131,072 tokens/step (32 sequences x 512 tokens x 4 micro-batches x 1 process), 4,000 "
                         "steps: 524.3M tokens = 1.11 epochs of the 471.0M training tokens")
    assert lines(300)[1] == ("note: this run sees 8.3% of one pass over its training data; --max_steps 3,594 makes "
                             "one epoch (or prepare less with --max_tokens)")
    assert len(lines(400)) == 1 and len(lines(71_000)) == 1  # 0.11 and 19.7 epochs
    assert lines(80_000)[1] == ("note: 22 epochs repeat the same data past the ~20 where a model learns it by heart; "
                                "--max_steps 71,868 makes 20, or train on more data (--dataset)")
    assert "8 processes), 4,000 steps, resuming at step 1,200: 4.19B tokens" in \
        plan_lines(1_048_576, 256, 1, 8, 512, 4000, 1200, train_tokens=471_000_000)[0]


def test_eta_line():
    assert eta_line(1000, 4000, 131_072, 702_000) == "~9.3 min to step 4,000 at 702k tok/s"
    assert eta_line(20, 60, 2048, 7_000) == "~12 s to step 60 at 7,000 tok/s"
    assert eta_line(100, 6000, 524_288, 450_000) == "~1.9 h to step 6,000 at 450k tok/s"
    assert eta_line(1000, 4000, 131_072, 702_000, max_seconds=300, train_seconds=100) == \
        "~9.3 min to step 4,000 at 702k tok/s; --max_seconds 300 stops it near step 2,071"


def test_study_plans_arms_with_auto_batch(tmp_path):
    """The study planner takes an arm's tokens per step from --tokens_per_step when its micro-batch is auto."""
    flags = {"preset": "tiny", "batch_size": "auto", "tokens_per_step": 4096}
    spec = {"dataset": str(SHAKESPEARE), "budget": {"tokens": 10 * 4096 + 5}, "seeds": [1],
            "out_dir": str(tmp_path / "study"), "data_dir": str(tmp_path / "data"), "flags": flags,
            "arms": [{"name": "llama", "model": "StoryLlama"}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    (p,) = plan(load_study(str(tmp_path / "study.yaml")))
    assert (p.tokens_per_step, p.max_steps) == (4096, 10)
    spec["flags"] = {"preset": "tiny", "batch_size": "auto"}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match="arm llama: --batch_size auto divides --tokens_per_step into micro-batches"):
        plan(load_study(str(tmp_path / "study.yaml")))


@pytest.mark.cuda
def test_auto_on_cuda_takes_the_allocator_peak_of_a_trial_step():
    model = tiny_model("StoryLlama").cuda()
    objective = NextTokenPrediction(model)

    def measure(micro_batch: int) -> float:
        return trial_bytes(model, objective, micro_batch, torch.bfloat16)

    four, eight = measure(4), measure(8)
    assert 0 < four < eight < 2**30 and all(p.grad is None for p in model.parameters())
    assert largest_micro_batch(16, (four + eight) / 2, measure)[0] == 4
