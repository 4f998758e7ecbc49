"""`python -m smolhub.eval`: a checkpoint's report card, from bits per byte on a dataset and/or
downstream tasks run by lm-evaluation-harness from its own task definitions."""
from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from smolhub.cli import parse_cli, run_main
from smolhub.config import option
from smolhub.errors import UserError

# Zero-shot tasks on which models of SmolHub's sizes score above chance
SUITES = {
    "zero_shot": ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai", "sciq", "copa"],
}

SUITE_HELP = "; ".join(f"{name} = {', '.join(tasks)}" for name, tasks in SUITES.items())


@dataclass
class EvalArgs:
    checkpoint: str = option("", "Checkpoint folder, a run's out_dir (newest checkpoint) or a Hub repo id.")
    tasks: str = option("", "Comma-separated lm-evaluation-harness tasks or groups (hellaswag,arc_easy,...), "
                        "as `lm-eval ls tasks` lists them; their data comes from the Hugging Face Hub.")
    suite: str = option("", f"A named set of tasks, run besides --tasks: {SUITE_HELP}.")
    include_path: str = option("", "A folder of extra task definitions (YAML, with local data such as JSONL: these "
                               "run offline).")
    num_fewshot: int = option(-1, "Examples in each task prompt (-1 = each task's own default).")
    limit: float = option(0, "Examples per task: a count, or a fraction below 1 (0 = all).")
    dataset: str = option("", "Score a dataset's text, as the trainer takes it (Hub name, file or folder): "
                          "loss, perplexity and bits per byte.")
    split: Literal["val", "train"] = option("val", "Which part of --dataset: the trainer's validation text, or the rest.")
    max_tokens: int = option(0, "Score the first this many tokens of --dataset (0 = the whole split).")
    data_dir: str = option("data_cache", "Where --dataset's tokenised shards are cached (shared with the trainer).")
    batch_size: int = option(8, "Sequences per forward pass.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option("auto", "Weights dtype; auto = bf16 on CUDA.")
    out: str = option("", "Folder for report_card.md and report_card.json (default: the checkpoint's folder, "
                      "where `smolhub_hub push` finds it; eval/<repo> for a Hub repo id).")


def task_names(args: EvalArgs) -> list[str]:
    if args.suite and args.suite not in SUITES:
        raise UserError(f"--suite {args.suite!r} is unknown; choose from {', '.join(SUITES)}")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] + SUITES.get(args.suite, [])
    return list(dict.fromkeys(names))


def hub_offline_unless_reachable() -> None:
    """Without the Hub, `datasets` retries for ~25 s per task before failing; offline mode fails at once
    and still finds data already in the local cache. Set before `datasets` is imported, which reads it."""
    from smolhub.tokenizer import hub_reachable

    if not hub_reachable():
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"


def task_manager(args: EvalArgs, names: list[str]):
    """The harness's task index (its own tasks and --include_path's), with every name checked."""
    from lm_eval.tasks import TaskManager

    if args.include_path and not Path(args.include_path).is_dir():
        raise UserError(f"--include_path {args.include_path}: no such folder")
    manager = TaskManager(include_path=args.include_path or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown task {unknown[0]!r}: {hint}`lm-eval ls tasks` lists the harness's tasks; "
                        "give your own with --include_path")
    return manager


def run_tasks(lm, names: list[str], manager, args: EvalArgs) -> dict:
    """lm-evaluation-harness's simple_evaluate on the named tasks: its results["results"]."""
    import lm_eval

    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                          num_fewshot=None if args.num_fewshot < 0 else args.num_fewshot,
                                          limit=args.limit or None, log_samples=False)
    except ConnectionError as e:
        raise UserError(f"{str(e).splitlines()[0]}: the tasks' data is on the Hugging Face Hub, which cannot be "
                        "reached from here; connect to the network, or run tasks of local data with --include_path"
                        ) from None
    return results["results"]


def report_folder(args: EvalArgs, engine) -> Path:
    if args.out:
        return Path(args.out)
    if Path(args.checkpoint).expanduser().exists():
        return engine.path
    return Path("eval") / args.checkpoint.replace("/", "__")


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_cli((EvalArgs,), {}, argv, prog="python -m smolhub.eval",
                        description="Evaluate a SmolHub checkpoint: bits per byte on a dataset (--dataset), "
                                    "downstream tasks through lm-evaluation-harness (--tasks, --suite); writes "
                                    "and prints its report card.")
    if not args.checkpoint:
        raise UserError("--checkpoint is required (a checkpoint folder, a run's out_dir or a Hub repo id)")
    names = task_names(args)
    if not names and not args.dataset:
        raise UserError("nothing to evaluate: give --tasks, --suite or --dataset")
    hub_offline_unless_reachable()  # before anything imports `datasets`: the imports below are in here
    manager = task_manager(args, names) if names else None
    from smolhub.eval.report import report_card, report_card_markdown, write_report_card
    from smolhub.inference import load_model

    engine = load_model(args.checkpoint, args.device, args.dtype)
    intrinsic = None
    if args.dataset:
        from smolhub.eval.intrinsic import evaluate_text

        intrinsic = evaluate_text(engine, args.dataset, data_dir=args.data_dir, max_tokens=args.max_tokens,
                                  batch_size=args.batch_size, split=args.split)
    tasks = None
    if names:
        from smolhub.eval.harness import SmolHubLM

        tasks = run_tasks(SmolHubLM(engine, batch_size=args.batch_size), names, manager, args)
    card = report_card(engine, intrinsic, tasks)
    md_path, json_path = write_report_card(report_folder(args, engine), card)
    print(report_card_markdown(card))
    print(f"report card written to {md_path} and {json_path}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
