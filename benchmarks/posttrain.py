"""Does post-training work, in numbers? Pretrain, then instruction-tune, LoRA-tune and DPO-tune, and
score held-out exact match on the generated task suite (smolhub.finetune.tasks) after each stage.

For each model: pretrain on the books (trainer.py), score the base model few-shot (solved examples
as plain text: it has no chat format yet), then through finetune.py, each a fresh process as a user
runs it, score in chat format:
  sft           full fine-tune on the suite's training conversations, from the base model
  lora          LoRA adapters on the attention (and dense feed-forward) projections, from the base model
  lora_experts  LoRA on the MoE experts' weights too (MoE models only)
  dpo           DPO on the suite's preference pairs (right answer vs. a plausible wrong one), from sft
A LoRA run is scored from its own checkpoint, which loads as the base with the adapter folded in.

    python -m benchmarks.posttrain --data path/to/gutenberg --gpt2 path/to/gpt2 --out results/posttrain

Writes posttrain.json and posttrain.md (the table) into --out after every stage, so a run cut short
keeps what it measured; a stage that fails is reported and the others still run (the command then
exits non-zero). Minutes are each stage's wall clock, process start-up and compiling
included. On CPU, `--toy` runs the same pipeline with the tiny presets on a small text (the test
suite's run, so that it cannot rot).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from smolhub.data.__main__ import parse_count
from smolhub.finetune.tasks import (
    TASKS,
    evaluate_exact_match,
    make_suite,
    write_suite,
)
from smolhub.files import write_json, write_text_atomically
from smolhub.inference import load_model
from smolhub.modeling import model_class

REPO = Path(__file__).resolve().parents[1]
MOE = {"SmolMixtral", "StoryMixtral"}
STAGES = {  # stage -> (finetune method, the stage it starts from, extra finetune.py flags)
    "sft": ("sft", "base", []),
    "lora": ("sft", "base", ["--lora_rank", "{lora_rank}"]),  # and --no_lora_experts on an MoE model
    "lora_experts": ("sft", "base", ["--lora_rank", "{lora_rank}", "--lora_experts"]),
    "dpo": ("dpo", "sft", []),
}


def run(cmd: list[str], log: Path) -> float:
    """Run a script as a user would, from the repository's code; seconds it took. Its output goes to
    `log`; a failure stops the benchmark with the end of that log."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, check=False, cwd=log.parent, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{cmd[1]} exited {proc.returncode} after {seconds:.0f}s; end of {log}:\n{tail}")
    return seconds


def trained(out_dir: Path, seconds: float) -> dict:
    """What a finished run in out_dir did: its folder, tokens, minutes and last held-out metrics
    (from metrics.jsonl)."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluated = [r for r in records if "val_loss" in r]
    return {"checkpoint": str(out_dir), "train_tokens": max(r["tokens"] for r in records if "tokens" in r),
            "train_minutes": seconds / 60,
            "val": {k: v for k, v in evaluated[-1].items() if k.startswith("val_")} if evaluated else {}}


def pretrain(name: str, args, out: Path) -> dict:
    run_dir = out / f"{name}-base"
    common = ["--out_dir", str(run_dir), "--data_dir", str(out / "data"), "--overwrite", "--wandb_mode", "disabled",
              "--sample_interval", "0", "--num_proc", str(args.num_proc), "--device", args.device]
    if args.toy:
        flags = ["--preset", "tiny", "--dataset", args.data, "--max_steps", str(args.pretrain_steps)]
    else:
        block = model_class(name).config_class().block_size
        batch = max(1, args.tokens_per_step // block)
        steps = max(1, args.tokens // (batch * block))
        # the same --max_tokens for every model: one tokenised preparation serves them all
        flags = ["--dataset", args.data, "--tokenizer", args.gpt2, "--batch_size", str(batch),
                 "--tokens_per_step", str(batch * block), "--max_steps", str(steps), "--max_tokens",
                 str(args.tokens), "--lr", str(args.pretrain_lr), "--min_lr", str(args.pretrain_lr / 10),
                 "--warmup_steps", str(max(1, steps // 20)), "--eval_interval", str(steps), "--save_interval",
                 str(steps), "--log_interval", "50", "--compile", args.pretrain_compile]
    return trained(run_dir, run([sys.executable, str(REPO / name / "trainer.py"), *flags, *common],
                                out / f"{name}-base.log"))


def finetune(name: str, stage: str, init_from: str, args, out: Path) -> dict:
    method, _, extra = STAGES[stage]
    run_dir = out / f"{name}-{stage}"
    data = out / "tasks" / f"{method}_train.jsonl"
    steps = args.dpo_steps if method == "dpo" else args.sft_steps
    lr = args.dpo_lr if method == "dpo" else args.lora_lr if "--lora_rank" in extra else args.sft_lr
    flags = ["--method", method, "--init_from", init_from, "--dataset", str(data), "--out_dir", str(run_dir),
             "--max_steps", str(steps), "--lr", str(lr), "--min_lr", str(lr / 10), "--warmup_steps",
             str(max(1, steps // 10)), "--batch_size", str(args.ft_batch_size), "--eval_interval", str(steps),
             "--save_interval", str(steps), "--log_interval", "10", "--sample_interval", "0", "--compile",
             args.ft_compile, "--wandb_mode", "disabled", "--overwrite", "--device", args.device,
             *[flag.format(lora_rank=args.lora_rank) for flag in extra]]
    if stage == "lora" and name in MOE:
        flags.append("--no_lora_experts")
    return trained(run_dir, run([sys.executable, str(REPO / name / "finetune.py"), *flags], out / f"{name}-{stage}.log"))


def score(checkpoint: str, mode: str, test, examples, args) -> tuple[dict, float]:
    start = time.perf_counter()
    engine = load_model(checkpoint, args.device)
    results = evaluate_exact_match(engine, None, test, mode, args.shots, examples, args.max_new_tokens,
                                   args.eval_batch_size)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results, time.perf_counter() - start


def markdown(report: dict) -> str:
    lines = [(f"Held-out exact match on {report['test_items']} generated task items "
              f"({report['train_items']} training items, seed {report['seed']}); {report['device']}."), "",
             "| model | stage | from | exact match | " + " | ".join(TASKS) + " | tokens | minutes |",
             "|---|---|---|---|" + "---|" * len(TASKS) + "---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['stage']} | {r['from']} | failed (posttrain.json says why) |"
                         + " |" * (len(TASKS) + 2))
            continue
        tasks = " | ".join(f"{r['tasks'][t]:.0%}" for t in TASKS)
        lines.append(f"| {r['model']} | {r['stage']} | {r['from']} | **{r['accuracy']:.1%}** | {tasks} | "
                     f"{r['train_tokens']:,} | {r['train_minutes']:.1f} |")
    lines += ["", "base: pretraining, scored few-shot ({shots} solved examples as text); the others: fine-tuning "
              "from `from`, scored in chat format. tokens and minutes are the stage's own (wall clock, start-up and "
              "compiling included).".format(shots=report["shots"]), "", "```", report["command"], "```"]
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path) -> None:
    write_json(out / "posttrain.json", report, indent=1)
    write_text_atomically(out / "posttrain.md", markdown(report))


def run_stage(name: str, stage: str, done: dict, test, examples, args, out: Path) -> dict:
    """Train one stage (pretraining for base) and score it; `done` collects the trained stages."""
    if stage == "base":
        trained_stage = pretrain(name, args, out)
    else:
        trained_stage = finetune(name, stage, done[STAGES[stage][1]]["checkpoint"], args, out)
    mode = "few_shot" if stage == "base" else "chat"
    results, eval_seconds = score(trained_stage["checkpoint"], mode, test, examples, args)
    done[stage] = trained_stage
    print(f"{name:<14}{stage:<14}exact match {results['accuracy']:6.1%}   {trained_stage['train_tokens']:>12,} tokens"
          f"  {trained_stage['train_minutes']:5.1f} min  (eval {eval_seconds:.0f}s)", flush=True)
    return {"model": name, "stage": stage, "from": "-" if stage == "base" else STAGES[stage][1], "mode": mode,
            "accuracy": results["accuracy"], "tasks": {t: s["accuracy"] for t, s in results["tasks"].items()},
            **trained_stage, "eval_seconds": eval_seconds, "items": results["items"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Pretraining text: the Gutenberg books folder (Tiny Shakespeare's "
                   "input.txt with --toy).")
    p.add_argument("--gpt2", default="", help="Folder with GPT-2's vocab.json + merges.txt (the tokenizer of every "
                   "model here); --toy trains the tiny presets' BPE instead.")
    p.add_argument("--models", nargs="+", default=["StoryLlama", "SmolMixtral"])
    p.add_argument("--tokens", type=parse_count, default=parse_count("20M"), help="Pretraining tokens per model.")
    p.add_argument("--tokens_per_step", type=int, default=32768)
    p.add_argument("--pretrain_lr", type=float, default=1e-3)
    p.add_argument("--pretrain_compile", choices=["auto", "true", "false"], default="false",
                   help="torch.compile in pretraining: at 20M tokens compiling (25-120 s) costs about what it saves.")
    p.add_argument("--pretrain_steps", type=int, default=30, help="Pretraining steps with --toy.")
    p.add_argument("--train_items", type=int, default=10000)
    p.add_argument("--test_items", type=int, default=600)
    p.add_argument("--seed", type=int, default=0, help="Seed of the task suite.")
    p.add_argument("--sft_steps", type=int, default=200)
    p.add_argument("--dpo_steps", type=int, default=60)
    p.add_argument("--ft_batch_size", type=int, default=16, help="Rows per fine-tuning step (packed SFT rows of "
                   "the model's context; DPO pairs).")
    p.add_argument("--sft_lr", type=float, default=1e-4)
    p.add_argument("--lora_lr", type=float, default=1e-3)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--dpo_lr", type=float, default=1e-5)
    p.add_argument("--ft_compile", choices=["auto", "true", "false"], default="false",
                   help="torch.compile in fine-tuning (short runs: compiling costs more than it saves).")
    p.add_argument("--shots", type=int, default=3, help="Solved examples in the base model's few-shot prompts.")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--num_proc", type=int, default=min(16, os.cpu_count() or 1), help="Tokenising processes.")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N, for every stage.")
    p.add_argument("--toy", action="store_true", help="Tiny presets, a few steps (the CPU test).")
    p.add_argument("--out", default="posttrain_results")
    args = p.parse_args(argv)
    if not args.toy and not args.gpt2:
        p.error("--gpt2 is required (the GPT-2 tokenizer folder), unless --toy")
    out = Path(args.out).resolve()
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    args.data = str(Path(args.data).resolve())
    args.gpt2 = str(Path(args.gpt2).resolve()) if args.gpt2 else ""
    write_suite(out / "tasks", args.train_items, args.test_items, args.seed)
    examples, test = make_suite(args.shots * len(TASKS), args.test_items, args.seed)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    report = {"device": device, "torch": torch.__version__, "train_items": args.train_items,
              "test_items": args.test_items, "seed": args.seed, "shots": args.shots,
              "command": "python -m benchmarks.posttrain " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "rows": []}
    failed = []
    for name in args.models:
        done: dict[str, dict] = {}
        for stage in ["base", "sft", "lora", *(["lora_experts"] if name in MOE else []), "dpo"]:
            origin = "-" if stage == "base" else STAGES[stage][1]
            try:
                if origin != "-" and origin not in done:
                    raise RuntimeError(f"not run: the {origin} stage it starts from failed")
                row = run_stage(name, stage, done, test, examples, args, out)
            except Exception as e:  # the other stages still run and report; the benchmark fails at the end
                row = {"model": name, "stage": stage, "from": origin, "error": str(e)}
                failed.append(f"{name} {stage}")
                print(f"{name} {stage} failed: {e}", flush=True)
            report["rows"].append(row)
            save(report, out)
    print(markdown(report))
    if failed:
        raise RuntimeError(f"stages failed: {', '.join(failed)} (their errors are in {out / 'posttrain.json'})")
    return report


if __name__ == "__main__":
    main()
