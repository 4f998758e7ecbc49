"""Flags that must never be taken silently: abbreviations and other trainers' names, values that
corrupt a run, and what --resume and --init_from may change of the checkpoint they start from."""
import dataclasses
import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SHAKESPEARE, run_script, tiny_train_args
from smolhub.checkpoint import load_trainer_state
from smolhub.cli import parse_cli, parse_command
from smolhub.config import TrainConfig, reconcile_with_checkpoint
from smolhub.errors import UserError
from smolhub.inference import InferenceArgs
from smolhub.modeling import model_class
from smolhub.optim import lr_factor
from smolhub_hub.cli import COMMANDS

LLAMA = REPO / "StoryLlama"
CKPT = Path("out/run/ckpt-0000040")


def parse(*argv: str, model: str = "StoryLlama"):
    config = importlib.import_module(f"{model}.config")
    return parse_cli((model_class(model).config_class, TrainConfig), config.PRESETS, list(argv),
                     defaults=config.TRAIN_DEFAULTS)


def one_line(message: str) -> str:
    assert "\n" not in message, message
    return message


# --- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--max_step", "30"], "unrecognized flag --max_step; did you mean --max_steps?"),
    (["--learning_rate", "0.1"], "unrecognized flag --learning_rate; did you mean --lr?"),
    (["--learning-rate=0.1"], "unrecognized flag --learning-rate; did you mean --lr?"),
    (["--output_dir", "out"], "unrecognized flag --output_dir; did you mean --out_dir?"),
    (["--gradient_accumulation_steps", "4"], ("unrecognized flag --gradient_accumulation_steps; did you mean "
     "--tokens_per_step? (tokens per step = accumulation steps x --batch_size x --block_size x processes")),
    (["--per_device_train_batch_size", "8"], "did you mean --batch_size?"),
    (["--max_iters", "100"], "did you mean --max_steps?"),
    (["--num_train_steps", "100"], "did you mean --max_steps?"),
    (["--eval_only"], "unrecognized flag --eval_only; did you mean --eval_interval? (there is no evaluation-only run"),
    (["--no_tie_embedings"], "did you mean --no_tie_embeddings?"),
    (["--n_layers", "3", "--output_dir", "o"],
     "unrecognized flags --n_layers (did you mean --n_layer?), --output_dir (did you mean --out_dir?)"),
])
def test_unknown_and_abbreviated_flags_point_to_the_real_one(argv, message):
    with pytest.raises(UserError) as error:
        parse(*argv)
    assert message in one_line(str(error.value))


def test_suggestions_only_name_flags_of_that_script():
    with pytest.raises(UserError) as error:
        parse_cli((InferenceArgs,), {}, ["--learning_rate", "0.1"])
    assert str(error.value) == "unrecognized flag --learning_rate (run with --help to see every flag)"
    with pytest.raises(UserError, match="did you mean --max_new_tokens"):
        parse_cli((InferenceArgs,), {}, ["--max_length", "20"])
    with pytest.raises(UserError, match="unrecognized flag --max_new_token; did you mean --max_new_tokens"):
        parse_command(COMMANDS, ["push", "ckpt", "me/model", "--max_new_token", "5"], prog="p", description="d")


def test_unknown_config_field_suggests_ours(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"learning_rate": 0.1}))
    with pytest.raises(UserError, match=r"unknown config fields \['learning_rate'\] \(learning_rate: did you mean lr"):
        parse("--config", str(path))


def test_parser_reports_the_fields_given_on_the_command_line_or_in_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.002\nn_layer: 5\n")
    parsed = parse("--preset", "tiny", "--config", str(path), "--n-embd", "64", "--no_tie_embeddings",
                   "--dropout=0.1", "--resume")
    mcfg, cfg = parsed
    assert (mcfg.n_layer, mcfg.n_embd, cfg.lr, cfg.tokenizer) == (5, 64, 0.002, "bpe")
    # the preset's values and the script's defaults are defaults, not choices made for this run
    assert parsed.explicit == {"lr", "n_layer", "n_embd", "tie_embeddings", "dropout", "resume"}


@pytest.mark.parametrize("model, flag, says", [
    ("StoryLlama", "--no_tie_embeddings", "Give the output head its own weights"),
    ("StoryLlama", "--no_bf16_residual", "Under bf16 autocast, carry the residual stream in fp32"),
    ("SmolMixtral", "--no_noisy_routing", "Route on the clean router logits"),
])
def test_no_flags_say_what_turning_the_field_off_does(capsys, model, flag, says):
    with pytest.raises(SystemExit):
        parse("--help", model=model)
    text = " ".join(capsys.readouterr().out.split())
    assert says in text.split(f" {flag}, {flag.replace('_', '-')} ")[1][:len(says) + 20]


# --- values that corrupt training -----------------------------------------------------------------

@pytest.mark.parametrize("model, argv, message", [
    ("StoryLlama", ["--grad_clip", "-1"], "--grad_clip must be >= 0, got -1.0"),
    ("StoryLlama", ["--weight_decay", "-1"], "--weight_decay must be >= 0, got -1.0"),
    ("StoryLlama", ["--beta1", "1.5"], "--beta1 must be in [0, 1), got 1.5"),
    ("StoryLlama", ["--beta2", "1"], "--beta2 must be in [0, 1), got 1.0"),
    ("StoryLlama", ["--beta1", "-0.1"], "--beta1 must be in [0, 1), got -0.1"),
    ("StoryLlama", ["--init_std", "-1"], "--init_std must be positive, got -1.0"),
    ("StoryLlama", ["--norm_eps", "-1"], "--norm_eps must be positive, got -1.0"),
    ("StoryLlama", ["--norm_eps", "0"], "--norm_eps must be positive, got 0.0"),
    ("StoryLlama", ["--lr", "nan"], "--lr must be a finite number, got nan"),
    ("StoryLlama", ["--min_lr", "inf"], "--min_lr must be a finite number, got inf"),
    ("StoryLlama", ["--peak_tflops", "-5"], "--peak_tflops must be >= 0, got -5.0"),
    ("StoryLlama", ["--schedule_steps", "-1"], "--schedule_steps must be >= 0, got -1"),
    ("StoryLlama", ["--rope_theta", "0"], "--rope_theta must be positive, got 0.0"),
    ("StoryLlama", ["--ffn_hidden", "0"], "--ffn_hidden must be positive, got 0"),
    ("SmolMixtral", ["--rope_theta", "-1"], "--rope_theta must be positive, got -1.0"),
    ("StoryMixtral", ["--capacity_factor", "nan"], "--capacity_factor must be a finite number, got nan"),
    ("StoryKimi", ["--rope_theta", "-10000"], "--rope_theta must be positive, got -10000.0"),
    ("StoryKimi", ["--routed_scaling_factor", "-1"], "--routed_scaling_factor must be positive, got -1.0"),
    ("SmolTransformer", ["--init_std", "0"], "--init_std must be positive, got 0.0"),
])
def test_values_that_corrupt_training_are_refused(model, argv, message):
    with pytest.raises(UserError) as error:
        parse("--preset", "tiny", *argv, model=model)
    assert str(error.value) == message


# --- what a resume or an init may change (the pure rule) ------------------------------------------

def checkpoint(*argv: str, step: int = 40) -> tuple[dict, dict]:
    """config.json and train_config of a StoryLlama checkpoint trained with `--preset tiny *argv`."""
    mcfg, cfg = parse("--preset", "tiny", "--dataset", "books.txt", *argv)
    mcfg.vocab_size = 512
    return {"architecture": "StoryLlama", "model": mcfg.to_dict(), "meta": {"step": step}}, dataclasses.asdict(cfg)


def reconcile(parsed, config: dict, train_config: dict | None, folder: Path = CKPT):
    return reconcile_with_checkpoint(*parsed, parsed.explicit, folder, config, train_config)


def test_resume_continues_the_checkpoint_with_this_invocations_logistics():
    config, train_config = checkpoint("--max_steps", "60", "--lr", "0.002", "--n_layer", "3", "--dropout", "0.1")
    mcfg, cfg, notes = reconcile(parse("--resume", "--out_dir", "elsewhere", "--eval_interval", "5",
                                       "--grad_checkpointing"), config, train_config)
    assert (mcfg.n_layer, mcfg.dropout, mcfg.vocab_size, mcfg.grad_checkpointing) == (3, 0.1, 512, True)
    assert (cfg.lr, cfg.max_steps, cfg.dataset, cfg.tokenizer, cfg.bpe_vocab_size) == (0.002, 60, "books.txt", "bpe",
                                                                                         512)
    assert (cfg.out_dir, cfg.eval_interval, cfg.resume, cfg.schedule_steps) == ("elsewhere", 5, "latest", 0)
    assert notes == []
    # the same values given again are no change
    reconcile(parse("--preset", "tiny", "--resume", "--dataset", "books.txt", "--lr", "0.002", "--n_layer", "3",
                    "--dropout", "0.1", "--max_steps", "60"), config, train_config)


def test_resume_refuses_every_flag_that_would_change_the_run_in_one_line():
    config, train_config = checkpoint("--max_steps", "60")
    with pytest.raises(UserError) as error:
        reconcile(parse("--preset", "tiny", "--resume", "--lr", "0.05", "--min_lr", "0.05", "--n_layer", "3",
                        "--block_size", "256", "--vocab_size", "1024", "--dropout", "0.2", "--tokenizer", "gpt2",
                        "--optimizer", "muon", "--seq_len_stages", "64", "--grad_clip", "0.5"), config, train_config)
    message = one_line(str(error.value))
    assert message.startswith("--resume continues ckpt-0000040 as it was trained: ")
    for part in ["--lr 0.05 (checkpoint: 0.003)", "--min_lr 0.05 (checkpoint: 0.0003)", "--n_layer 3 (checkpoint: 2)",
                 "--block_size 256 (checkpoint: 128)", "--vocab_size 1024 (checkpoint: 512)",
                 "--dropout 0.2 (checkpoint: 0.0)", "--tokenizer gpt2 (checkpoint: bpe)",
                 "--optimizer muon (checkpoint: adamw)", "--seq_len_stages 64 (checkpoint: '')",
                 "--grad_clip 0.5 (checkpoint: 1.0)", f"--init_from {CKPT}"]:
        assert part in message, part


def test_resume_with_more_steps_keeps_the_schedule_horizon():
    config, train_config = checkpoint("--max_steps", "60", step=60)
    _, cfg, notes = reconcile(parse("--resume", "--max_steps", "100"), config, train_config)
    assert (cfg.max_steps, cfg.schedule_steps, cfg.horizon) == (100, 60, 60)
    assert notes == [("--max_steps 100 (the checkpoint's run: 60): the schedule keeps its 60-step horizon "
                      "(--schedule_steps 60); steps 61-100 train at --min_lr 0.0003")]
    assert [lr_factor(step, cfg) for step in (60, 80, 99)] == [pytest.approx(0.1)] * 3  # min_lr / lr
    # a second extension keeps the first run's horizon; fewer steps than planned stop early on it
    config["meta"]["step"] = 100
    _, again, _ = reconcile(parse("--resume", "--max_steps", "150"), config, dataclasses.asdict(cfg))
    assert (again.max_steps, again.schedule_steps) == (150, 60)
    config, train_config = checkpoint("--max_steps", "60", step=20)
    _, shorter, notes = reconcile(parse("--resume", "--max_steps", "30"), config, train_config)
    assert (shorter.max_steps, shorter.horizon) == (30, 60) and "keeps its 60-step horizon" in notes[0]
    assert lr_factor(25, shorter) == lr_factor(25, TrainConfig(**{**train_config, "resume": ""}))
    with pytest.raises(UserError, match="ckpt-0000040 is at step 20 and --max_steps is 20, so nothing is left"):
        reconcile(parse("--resume", "--max_steps", "20"), config, train_config)
    with pytest.raises(UserError, match="--schedule_steps 100 \\(checkpoint: 0\\)"):  # re-stretching, spelled out
        reconcile(parse("--resume", "--max_steps", "100", "--schedule_steps", "100"), config, train_config)


def test_resume_of_a_finished_run_without_more_steps_is_refused():
    config, train_config = checkpoint("--max_steps", "40", step=40)
    with pytest.raises(UserError, match="--max_steps is 40, so nothing is left to train; pass a larger --max_steps"):
        reconcile(parse("--resume"), config, train_config)


def test_init_from_keeps_architecture_and_tokenizer_and_applies_training():
    config, _ = checkpoint("--n_layer", "3")
    mcfg, cfg, notes = reconcile(parse("--preset", "tiny", "--init_from", str(CKPT), "--dropout", "0.2",
                                       "--lr", "0.05", "--min_lr", "0.01", "--vocab_size", "0"), config, None)
    assert (mcfg.n_layer, mcfg.vocab_size, mcfg.dropout) == (3, 512, 0.2)
    assert (cfg.lr, cfg.min_lr, cfg.tokenizer, cfg.dataset) == (0.05, 0.01, str(CKPT), "tinystories")
    assert notes == []
    with pytest.raises(UserError) as error:
        reconcile(parse("--init_from", str(CKPT), "--n_layer", "4", "--n_embd", "192", "--tokenizer", "gpt2"),
                  config, None)
    assert one_line(str(error.value)) == (
        f"--init_from {CKPT} keeps the checkpoint's architecture and tokenizer: --n_layer 4 (checkpoint: 3), "
        "--n_embd 192 (checkpoint: 128), --tokenizer gpt2 (checkpoint: its own tokenizer); drop them")


@pytest.mark.parametrize("model, training, architecture", [
    ("SmolMixtral", {"aux_loss_weight": 0.05, "router_z_loss_weight": 0.001}, ("n_experts", 4)),
    ("StoryKimi", {"qk_clip_threshold": 50.0, "bias_update_rate": 0.0, "seq_aux_loss_weight": 0.0},
     ("kv_lora_rank", 16)),
])
def test_init_from_applies_loss_weights_and_refuses_architecture(model, training, architecture):
    mcfg, _ = parse("--preset", "tiny", model=model)
    config = {"architecture": model, "model": {**mcfg.to_dict(), "vocab_size": 512}, "meta": {"step": 10}}
    flags = [str(x) for name, value in training.items() for x in (f"--{name}", value)]
    new, _, _ = reconcile(parse("--init_from", "c", *flags, model=model), config, None)
    assert {name: getattr(new, name) for name in training} == training
    name, value = architecture
    with pytest.raises(UserError, match=f"--{name} {value} \\(checkpoint: {getattr(mcfg, name)}\\)"):
        reconcile(parse("--init_from", "c", f"--{name}", str(value), model=model), config, None)


# --- end to end, through StoryLlama's trainer.py --------------------------------------------------

def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 20-step tiny run with checkpoints at 10 and 20, and its data cache."""
    tmp = tmp_path_factory.mktemp("flags")
    run_script(tiny_train_args(tmp / "base", tmp / "data", "--max_steps", "20", "--warmup_steps", "5",
                               "--save_interval", "10", "--keep_last", "0"), LLAMA, tmp)
    return tmp


def copy_run(base: Path, tmp_path: Path, drop: str = "") -> Path:
    out = tmp_path / "run"
    shutil.copytree(base / "base", out)
    if drop:
        shutil.rmtree(out / drop)
    return out


def one_line_error(proc, *fragments: str) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_trainer_refuses_an_abbreviated_flag(tmp_path):
    proc = run_script(["trainer.py", "--preset", "tiny", "--out_dir", str(tmp_path / "out"), "--max_step", "30"],
                      LLAMA, check=False)
    one_line_error(proc, "unrecognized flag --max_step; did you mean --max_steps?")
    assert not (tmp_path / "out").exists()


def test_trainer_resume_refuses_changed_model_and_training_flags(base, tmp_path):
    out = copy_run(base, tmp_path)
    proc = run_script(tiny_train_args(out, base / "data", "--warmup_steps", "5", "--resume", "--lr", "0.05",
                                      "--min_lr", "0.05", "--n_layer", "3", "--block_size", "256", "--vocab_size",
                                      "1024", "--dropout", "0.2", "--tokenizer", "gpt2"), LLAMA, tmp_path, check=False)
    one_line_error(proc, "--resume continues ckpt-0000020 as it was trained", "--lr 0.05 (checkpoint: 0.003)",
                   "--min_lr 0.05 (checkpoint: 0.0003)", "--n_layer 3 (checkpoint: 2)",
                   "--block_size 256 (checkpoint: 128)", "--vocab_size 1024 (checkpoint: 512)",
                   "--dropout 0.2 (checkpoint: 0.0)", "--tokenizer gpt2 (checkpoint: bpe)", "--init_from")
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000010", "ckpt-0000020"]


def test_trainer_resume_takes_its_settings_from_the_checkpoint(base, tmp_path):
    """A resume given only logistics trains on the checkpoint's data, tokenizer and schedule: it
    ends bit-identical to the uninterrupted run and records the same training settings."""
    out = copy_run(base, tmp_path, drop="ckpt-0000020")
    run_script(["trainer.py", "--out_dir", str(out), "--data_dir", str(base / "data"), "--resume", "--deterministic",
                "--wandb_mode", "disabled", "--sample_interval", "0"], LLAMA, tmp_path)
    straight, resumed = base / "base" / "ckpt-0000020", out / "ckpt-0000020"
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ta, tb = (load_trainer_state(p)["train_config"] for p in (straight, resumed))
    for name in ["dataset", "tokenizer", "bpe_vocab_size", "lr", "min_lr", "warmup_steps", "max_steps", "batch_size"]:
        assert ta[name] == tb[name], name
    assert tb["dataset"] == str(SHAKESPEARE) and tb["tokenizer"] == "bpe"


def test_trainer_resume_with_more_steps_trains_them_at_min_lr(base, tmp_path):
    out = copy_run(base, tmp_path)
    proc = run_script(tiny_train_args(out, base / "data", "--warmup_steps", "5", "--resume", "--max_steps", "30",
                                      "--log_interval", "1"), LLAMA, tmp_path)
    assert ("--max_steps 30 (the checkpoint's run: 20): the schedule keeps its 20-step horizon (--schedule_steps 20); "
            "steps 21-30 train at --min_lr 0.0003") in proc.stdout
    extra = [r for r in records(out) if r["step"] > 20 and "lr" in r]
    assert [r["step"] for r in extra] == list(range(21, 31))
    assert all(r["lr"] == pytest.approx(3e-4) for r in extra), [r["lr"] for r in extra]
    state = load_trainer_state(out / "ckpt-0000030")["train_config"]
    assert (state["max_steps"], state["schedule_steps"]) == (30, 20)


def test_trainer_init_from_applies_dropout_and_lr_and_refuses_architecture(base, tmp_path):
    ckpt = base / "base" / "ckpt-0000020"
    out = tmp_path / "finetune"
    run_script(tiny_train_args(out, base / "data", "--init_from", str(ckpt), "--dropout", "0.2", "--lr", "0.01",
                               "--min_lr", "0.001", "--max_steps", "4", "--save_interval", "4"), LLAMA, tmp_path)
    model = json.loads((out / "ckpt-0000004" / "config.json").read_text())["model"]
    assert (model["dropout"], model["n_layer"], model["vocab_size"]) == (0.2, 2, 512)
    used = load_trainer_state(out / "ckpt-0000004")["train_config"]
    assert (used["lr"], used["min_lr"], used["tokenizer"]) == (0.01, 0.001, str(ckpt))
    proc = run_script(tiny_train_args(tmp_path / "refused", base / "data", "--init_from", str(ckpt), "--n_layer", "3",
                                      "--tokenizer", "gpt2"), LLAMA, tmp_path, check=False)
    one_line_error(proc, f"--init_from {ckpt} keeps the checkpoint's architecture and tokenizer",
                   "--n_layer 3 (checkpoint: 2)", "--tokenizer gpt2 (checkpoint: its own tokenizer)")


@pytest.mark.parametrize("model", ["SmolMixtral", "StoryKimi"])
def test_experts_kernel_is_this_runs_on_resume_and_the_default_on_load(model):
    """--experts_kernel says how, not what, the experts compute: a run trained with the Triton kernels
    resumes with another kernel, and its checkpoint loads for inference (or export) with the default,
    so a CPU without triton runs it."""
    mcfg, cfg = parse("--preset", "tiny", "--dataset", "books.txt", "--experts_kernel", "triton", model=model)
    mcfg.vocab_size = 512
    config = {"architecture": model, "model": mcfg.to_dict(), "meta": {"step": 40}}
    resumed, _, _ = reconcile(parse("--resume", "--experts_kernel", "grouped_mm", model=model), config,
                              dataclasses.asdict(cfg))
    assert resumed == dataclasses.replace(mcfg, experts_kernel="grouped_mm")
    loaded = type(mcfg).for_inference(config["model"])
    assert loaded == dataclasses.replace(mcfg, experts_kernel="auto")
