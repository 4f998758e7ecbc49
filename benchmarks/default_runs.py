"""What `python trainer.py` costs on this GPU: each model's default run, from the first minutes of it.

    python -m smolhub.compare benchmarks/studies/default_runs.yaml     # each recipe, 100 s of training
    python -m benchmarks.default_runs studies/default_runs             # the table

The study trains every model on its recipe (TRAIN_DEFAULTS in its config.py) and stops it after a few
minutes of training; this reads what each run reached. The steady rate is the median tok/s over the
logged windows after the first two (the first holds compilation, the second can hold the CUDA graphs'
capture). The whole run's time is its tokens at that rate: evaluation, saving and compilation are left
out, so it is a lower bound. The val bpb is the last evaluation's, where the time limit cut the run,
mid-schedule.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from smolhub.errors import UserError
from smolhub.plan import duration


def default_run_rows(study_dir: Path) -> list[dict]:
    """One row per arm of a finished study (its first seed): the recipe's plan, the steady rate, the
    whole run's time at that rate, and how far the time limit let it get."""
    try:
        report = json.loads((study_dir / "report.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{study_dir} has no report.json: run `python -m smolhub.compare "
                        "benchmarks/studies/default_runs.yaml` first, or name the folder its out_dir gives")
    rows = []
    for arm in report["arms"]:
        run = arm["runs"][0]
        records = [json.loads(line) for line in
                   (study_dir / arm["name"] / f"seed-{run['seed']}" / "metrics.jsonl").read_text().splitlines()]
        windows = [r for r in records if "tok_per_s" in r][2:]
        if not windows:
            raise UserError(f"arm {arm['name']} logged fewer than three windows: raise the study's time budget")
        rate = statistics.median(r["tok_per_s"] for r in windows)
        evals = [r for r in records if "val_bpb" in r]
        tokens = arm["max_steps"] * arm["tokens_per_step"]
        rows.append({"model": arm["name"], "tokens_per_step": arm["tokens_per_step"], "steps": arm["max_steps"],
                     "tokens": tokens, "tok_per_s": rate,
                     "mfu": statistics.median(r["mfu"] for r in windows) if "mfu" in windows[0] else None,
                     "seconds": tokens / rate, "reached_step": run["steps"],
                     "val_bpb": evals[-1]["val_bpb"], "val_step": evals[-1]["step"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | tokens a step | steps | tokens | steady tok/s | MFU | whole run | val bpb (at step) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "–"
        lines.append(f"| {r['model']} | {r['tokens_per_step']:,} | {r['steps']:,} | {r['tokens'] / 1e6:,.0f}M | "
                     f"{r['tok_per_s'] / 1e3:,.0f}k | {mfu} | {duration(r['seconds'])} | "
                     f"{r['val_bpb']:.3f} (step {r['val_step']:,} of {r['reached_step']:,} reached) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study_dir", help="The out_dir of a finished default-runs study (studies/default_runs).")
    p.add_argument("--json", help="Also write the rows here.")
    args = p.parse_args(argv)
    try:
        rows = default_run_rows(Path(args.study_dir))
    except UserError as e:
        p.exit(2, f"error: {e}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
