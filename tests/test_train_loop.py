"""The training engine's pieces: when the loop logs, evaluates, samples and saves, and a custom
objective running through the same loop as pretraining."""
import json

import torch

from conftest import SHAKESPEARE
from smolhub.config import TrainConfig
from smolhub.objectives import NextTokenPrediction
from smolhub.train import Due, train
from StoryLlama.config import PRESETS, StoryLlamaConfig
from StoryLlama.model import StoryLlama


def test_intervals_are_decided_in_one_place():
    cfg = TrainConfig(max_steps=25, log_interval=5, eval_interval=10, sample_interval=0, save_interval=20)
    due = {step: Due.at(step, cfg, stopping=False) for step in range(1, 26)}
    assert [s for s, d in due.items() if d.log] == [5, 10, 15, 20, 25]
    assert [s for s, d in due.items() if d.eval] == [10, 20, 25]  # and always at the last step
    assert [s for s, d in due.items() if d.save] == [20, 25]
    assert not any(d.sample for d in due.values())  # 0 disables samples, even at the end
    stopped = Due.at(7, cfg, stopping=True)
    assert stopped.save and not (stopped.log or stopped.eval)
    assert [s for s in range(1, 26) if Due.at(s, TrainConfig(max_steps=25, sample_interval=10), False).sample] \
        == [10, 20, 25]


class LossTwice:
    """A custom objective: pretraining's loss, plus a metric of its own."""

    def __init__(self, model):
        self.inner = NextTokenPrediction(model)

    def __call__(self, step_model, batch):
        loss, metrics = self.inner(step_model, batch)
        return loss, {**metrics, "loss_twice": 2 * metrics["loss"]}


def tiny_run(tmp_path, name, **extra):
    fields = {**PRESETS["tiny"], "dataset": str(SHAKESPEARE), "data_dir": str(tmp_path / "data"),
              "out_dir": str(tmp_path / name), "deterministic": True, "sample_interval": 0, "max_steps": 12,
              "log_interval": 4, "eval_interval": 6, "eval_batches": 2, "save_interval": 12}
    model_fields = {f: fields.pop(f) for f in list(fields) if f in StoryLlamaConfig.__dataclass_fields__}
    return StoryLlamaConfig(**model_fields), TrainConfig(**fields, **extra)


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_custom_objective_runs_through_the_same_loop(tmp_path):
    torch.set_num_threads(1)
    base = train(StoryLlama, *tiny_run(tmp_path, "base"))
    custom = train(StoryLlama, *tiny_run(tmp_path, "custom"), make_objective=LossTwice)
    assert custom["val_loss"] == base["val_loss"]  # the same training, step for step
    logged = records(tmp_path / "custom")
    trained = [r for r in logged if "loss" in r]
    assert [r["step"] for r in trained] == [4, 8, 12]
    assert all(r["loss_twice"] == 2 * r["loss"] for r in trained)
    evaluated = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [0, 6, 12]
    assert all(r["val_loss_twice"] == 2 * r["val_loss"] for r in evaluated[1:])
    assert [r["loss"] for r in trained] == [r["loss"] for r in records(tmp_path / "base") if "loss" in r]
