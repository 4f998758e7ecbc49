"""The training engine's pieces: when the loop logs, evaluates, samples and saves, and a custom
objective running through the same loop as pretraining."""
import json

import torch

from conftest import SHAKESPEARE
from smolhub.config import TrainConfig
from smolhub.objectives import Objective
from smolhub.train import Due, next_token_prediction, train
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


class LossTwice(Objective):
    """A custom objective: pretraining's loss, plus a metric of its own."""

    def __init__(self, model, tokenizer):
        self.inner = next_token_prediction(model, tokenizer)

    def __call__(self, step_model, batch):
        loss, metrics = self.inner(step_model, batch)
        return loss, {**metrics, "loss_twice": 2 * metrics["loss"]}

    def summarize(self, means):
        return self.inner.summarize(means)


def tiny_run(tmp_path, name, **extra):
    fields = {**PRESETS["tiny"], "dataset": str(SHAKESPEARE), "data_dir": str(tmp_path / "data"),
              "out_dir": str(tmp_path / name), "deterministic": True, "sample_interval": 0, "max_steps": 12,
              "log_interval": 4, "eval_interval": 6, "eval_batches": 2, "save_interval": 12}
    model_fields = {f: fields.pop(f) for f in list(fields) if f in StoryLlamaConfig.__dataclass_fields__}
    return StoryLlamaConfig(**model_fields), TrainConfig(**{**fields, **extra})


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


def test_val_bpb_agrees_with_the_evaluation_command_on_the_same_text(tmp_path):
    """The trainer's val_bpb (first eval_batches x batch_size windows of the validation split) and
    smolhub.eval's evaluate_text over the same windows: two implementations, one number."""
    from smolhub.eval.intrinsic import evaluate_text
    from smolhub.inference import load_model

    torch.set_num_threads(1)
    mcfg, cfg = tiny_run(tmp_path, "run")
    train(StoryLlama, mcfg, cfg)
    last = [r for r in records(tmp_path / "run") if "val_bpb" in r][-1]
    engine = load_model(str(tmp_path / "run"), device="cpu")
    windows = cfg.eval_batches * cfg.batch_size
    scored = evaluate_text(engine, cfg.dataset, data_dir=cfg.data_dir,
                           max_tokens=windows * mcfg.block_size, batch_size=cfg.batch_size)
    assert scored["windows"] == windows
    assert abs(scored["bpb"] - last["val_bpb"]) < 1e-5 and abs(scored["loss"] - last["val_loss"]) < 1e-5
    assert 0 < last["val_bpb"] < last["val_loss"] / 0.6931  # a token of this BPE stands for more than one byte


def test_max_seconds_ends_a_run_like_its_last_step(tmp_path):
    torch.set_num_threads(1)
    mcfg, cfg = tiny_run(tmp_path, "timed", max_steps=100_000, max_seconds=1.0)
    result = train(StoryLlama, mcfg, cfg)
    logged = records(tmp_path / "timed")
    assert 0 < result["step"] < 100_000 and result["stopped_by"] is None
    final = logged[-1]
    assert final["step"] == result["step"] and "val_bpb" in final and "loss" in final  # logged and evaluated
    assert 1.0 <= final["seconds"] < 1.0 + 5.0  # the step that crossed the limit was the last
    assert (tmp_path / "timed" / f"ckpt-{result['step']:07d}").is_dir()
    assert Due.at(7, TrainConfig(max_steps=25), stopping=False, out_of_time=True) == Due(True, True, True, True)
