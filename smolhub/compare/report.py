"""A study's report: every run's numbers read back from its metrics.jsonl and final checkpoint,
summed up per arm over the seeds (report.json, report.md) and drawn (bpb_vs_*.png)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from smolhub.checkpoint import latest_checkpoint, read_meta
from smolhub.compare.stats import mean_std, welch_p
from smolhub.compare.study import Plan, Study, evaluate_tasks, read_records, run_folder
from smolhub.errors import UserError

PLOT_AXES = {"tokens": "tokens", "flops": "training FLOPs", "seconds": "training seconds"}


def run_summary(study: Study, p: Plan, seed: int) -> dict:
    """A finished run's numbers, all read from its metrics.jsonl and final checkpoint."""
    out = run_folder(study, p.arm, seed)
    records = read_records(out)
    curve = [{"step": r["step"], "tokens": r["tokens"], "flops": p.flops_per_token * r["tokens"],
              "seconds": r["seconds"], "val_bpb": r["val_bpb"]} for r in records if "val_bpb" in r]
    if not curve:
        raise UserError(f"{out}/metrics.jsonl has no val_bpb: it was trained by an older SmolHub; move it away and "
                        "run the study again")
    last = records[-1]
    meta = read_meta(latest_checkpoint(out))
    memory = [r["peak_mem_gib"] for r in records if "peak_mem_gib" in r]
    return {"seed": seed, "out_dir": str(out), "steps": last["step"], "tokens": last["tokens"],
            "flops": p.flops_per_token * last["tokens"], "train_seconds": last["seconds"],
            "tok_per_s": last["tokens"] / last["seconds"] if last["seconds"] else None,
            "peak_mem_gib": max(memory) if memory else None, "val_bpb": curve[-1]["val_bpb"],
            "val_loss": [r for r in records if "val_bpb" in r][-1].get("val_loss"), "params": meta.get("params"),
            "active_params": meta.get("active_params"),
            "tasks": task_scores(evaluate_tasks(study, out)) if study.tasks else {}, "curve": curve}


def task_scores(card_tasks: list[dict]) -> dict[str, float]:
    """A report card's scores by "task: metric"."""
    return {f"{t['task']}: {t['metric']}": t["value"] for t in card_tasks}


def summarize(study: Study, plans: list[Plan]) -> dict:
    """report.json: the study, and per arm its plan, its runs and its val bpb over the seeds with
    Welch's p-value against the first arm."""
    arms = []
    for p in plans:
        runs = [run_summary(study, p, seed) for seed in study.seeds]
        tasks = {name: mean_std([r["tasks"][name] for r in runs]) for name in runs[0]["tasks"]
                 if all(name in r["tasks"] for r in runs)}
        arms.append({"name": p.arm.name, "model": p.arm.model, "flags": p.arm.flags, "max_steps": p.max_steps,
                     "tokens_per_step": p.tokens_per_step, "flops_per_token": p.flops_per_token,
                     "params": runs[0]["params"], "active_params": runs[0]["active_params"],
                     "val_bpb": mean_std([r["val_bpb"] for r in runs]), "tasks": tasks, "runs": runs})
    first = [r["val_bpb"] for r in arms[0]["runs"]]
    for arm in arms:
        arm["p_vs_first"] = welch_p(first, [r["val_bpb"] for r in arm["runs"]]) if arm is not arms[0] else None
    kind, amount = study.budget
    return {"budget": {kind: amount}, "dataset": study.dataset, "seeds": study.seeds, "tasks": study.tasks,
            "arms": arms}


def write_report(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for axis in PLOT_AXES:
        plot(report, axis, out_dir / f"bpb_vs_{axis}.png")
    (out_dir / "report.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    arms, first = report["arms"], report["arms"][0]["name"]
    (kind, amount), = report["budget"].items()
    budget = f"{amount:.3g}" if kind == "flops" else f"{amount:,.0f}"
    lines = [f"# Study: {', '.join(a['name'] for a in arms)}", "",
             f"Equal {kind} ({budget}) on `{report['dataset']}`, seeds {report['seeds']}. Val bpb: the final "
             f"validation bits per byte, mean ± std over the seeds; p: Welch's t-test against {first}. Seconds: "
             "training time (compilation included; evaluation, samples and saves not). Where the seeds differ, "
             "a range.", "",
             f"| arm | model | params (active) | steps | tokens | FLOPs | seconds | tok/s | peak memory | val bpb "
             f"| p vs {first} |", "|---" * 11 + "|"]
    lines += [table_row(arm) for arm in arms]
    if all(r["peak_mem_gib"] is None for a in arms for r in a["runs"]):
        lines += ["", "Peak memory: none logged by these runs (`peak_mem_gib` in metrics.jsonl; CPU runs have none)."]
    scores = list(dict.fromkeys(name for a in arms for name in a["tasks"]))
    if scores:
        lines += ["", "| arm | " + " | ".join(scores) + " |", "|---" * (len(scores) + 1) + "|"]
        lines += ["| " + " | ".join([a["name"], *(plus_minus(a["tasks"][n]) if n in a["tasks"] else "—"
                                                  for n in scores)]) + " |" for a in arms]
    lines += [""] + [f"![val bpb against {label}](bpb_vs_{axis}.png)" for axis, label in PLOT_AXES.items()] + [""]
    return "\n".join(lines)


def table_row(arm: dict) -> str:
    runs = arm["runs"]
    memory = [r["peak_mem_gib"] for r in runs if r["peak_mem_gib"] is not None]
    cells = [arm["name"], arm["model"], f"{arm['params'] / 1e6:.2f}M ({arm['active_params'] / 1e6:.2f}M)",
             spread([r["steps"] for r in runs], "{:,.0f}"), spread([r["tokens"] for r in runs], "{:,.0f}"),
             spread([r["flops"] for r in runs], "{:.3g}"), spread([r["train_seconds"] for r in runs], "{:,.1f}"),
             spread([r["tok_per_s"] for r in runs if r["tok_per_s"]], "{:,.0f}"),
             f"{max(memory):.2f} GiB" if memory else "n/a", plus_minus(arm["val_bpb"]),
             "—" if arm["p_vs_first"] is None else f"{arm['p_vs_first']:.3g}"]
    return "| " + " | ".join(cells) + " |"


def plus_minus(stat: dict) -> str:
    return f"{stat['mean']:.4f}" + (f" ± {stat['std']:.4f}" if stat["std"] is not None else "") + f" (n={stat['n']})"


def spread(values: list[float], fmt: str) -> str:
    """One value, or the range over the seeds where they differ."""
    if not values:
        return "n/a"
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}–{high}"


def plot(report: dict, axis: str, path: Path) -> None:
    """Val bpb against `axis`: each arm's mean over the seeds at each evaluation its seeds share, the
    seeds' min-max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in report["arms"]:
        curves = [{point["step"]: point for point in run["curve"]} for run in arm["runs"]]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        x = [statistics.fmean(c[s][axis] for c in curves) for s in steps]
        ys = [[c[s]["val_bpb"] for c in curves] for s in steps]
        line, = ax.plot(x, [statistics.fmean(y) for y in ys], "o-", markersize=3, label=arm["name"])
        ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.2)
    ax.set_xlabel(PLOT_AXES[axis])
    ax.set_ylabel("val bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
