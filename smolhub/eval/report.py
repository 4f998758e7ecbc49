"""A checkpoint's report card: what the model is, what it was trained on, and how it scores, as one
Markdown table (report_card.md) and the same numbers as JSON (report_card.json).

`python -m smolhub_hub push` puts the Markdown table into the model card and uploads the JSON.
"""
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from smolhub.data.sources import HUB_DATASETS
from smolhub.errors import UserError
from smolhub.files import write_text_atomically

MARKDOWN_NAME, JSON_NAME = "report_card.md", "report_card.json"


def _dataset_name(dataset: str | None) -> str | None:
    """A source name as it is; a local file or folder by its name alone, so the card reads the same
    wherever it was made (and a pushed card shows no local paths)."""
    if not dataset or dataset in HUB_DATASETS or dataset in ("synthetic", "tinyshakespeare"):
        return dataset
    return Path(dataset).name


def _number(value) -> float | None:
    """A finite float, or None for what lm-eval leaves unmeasured ("N/A", nan)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def task_scores(results: dict) -> list[dict]:
    """lm-eval's results ({"hellaswag": {"acc,none": 0.3, "acc_stderr,none": 0.01, ...}, ...}) as one
    {task, metric, value, stderr} per task and metric. A metric under a filter other than "none"
    (gsm8k's "exact_match,strict-match") is named with it: "exact_match (strict-match)"."""
    scores = []
    for task, entry in results.items():
        for key, value in entry.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or _number(value) is None:  # alias, sample_len: not scores
                continue
            stderr_key = f"{metric}_stderr,{filter_name}"
            name = metric if filter_name == "none" else f"{metric} ({filter_name})"
            scores.append({"task": task, "metric": name, "value": _number(value),
                           "stderr": _number(entry.get(stderr_key))})
    return scores


def report_card(engine, intrinsic: dict | None, tasks: dict | None) -> dict:
    """The report card of `engine`'s checkpoint (what smolhub.inference.load_model returns):
    `intrinsic` is what smolhub.eval.intrinsic.evaluate_text returns, `tasks` the "results" of
    lm-eval's simple_evaluate; either may be None."""
    model, meta = engine.model, engine.meta
    if intrinsic is not None:
        intrinsic = {**intrinsic, "dataset": _dataset_name(intrinsic["dataset"])}
    return {
        "date": datetime.now(timezone.utc).date().isoformat(),
        "checkpoint": engine.path.name if engine.path is not None else None,
        "architecture": model.architecture,
        "params": model.num_params(),
        "active_params": model.num_active_params(),
        "step": meta.get("step"),
        "tokens_trained": meta.get("tokens_seen"),
        "dataset": _dataset_name(meta.get("dataset")),
        "intrinsic": intrinsic,
        "tasks": task_scores(tasks or {}),
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def report_card_markdown(card: dict) -> str:
    """The card as a heading and one table: facts of the model and its training, then each score with
    its standard error."""
    def fact(name: str, value: str) -> str:
        return f"| {name} | {value} | |"

    def score(name: str, value: float | None, stderr: float | None) -> str:
        return f"| {name} | {_fmt(value)} | {_fmt(stderr)} |"

    title = card["architecture"] + (f", {card['checkpoint']}" if card.get("checkpoint") else "")
    rows = ["| | value | ± standard error |", "|---|---|---|",
            fact("date", card["date"]),
            fact("architecture", card["architecture"]),
            fact("parameters", f"{card['params'] / 1e6:.2f}M total, {card['active_params'] / 1e6:.2f}M active"),
            fact("trained on", card["dataset"] or "not recorded")]
    if card.get("tokens_trained") is not None:
        rows.append(fact("tokens trained", f"{card['tokens_trained']:,}"))
    if card.get("step") is not None:
        rows.append(fact("training steps", f"{card['step']:,}"))
    intrinsic = card.get("intrinsic")
    if intrinsic:
        rows += [fact("evaluated on", f"{intrinsic['dataset']} ({intrinsic['split']}), {intrinsic['tokens']:,} "
                      f"tokens, {intrinsic['bytes']:,} bytes"),
                 score("bits per byte", intrinsic["bpb"], intrinsic["bpb_stderr"]),
                 score("perplexity", intrinsic["perplexity"], intrinsic["perplexity_stderr"]),
                 score("loss (nats/token)", intrinsic["loss"], intrinsic["loss_stderr"])]
    rows += [score(f"{t['task']}: {t['metric']}", t["value"], t["stderr"]) for t in card["tasks"]]
    return "\n".join([f"# Report card: {title}", "", *rows, ""])


def write_report_card(folder, card: dict) -> tuple[Path, Path]:
    """Write report_card.md and report_card.json into `folder` (a checkpoint folder, say), each
    replacing any earlier one in one step; return their paths."""
    folder = Path(folder).expanduser()
    md_path, json_path = folder / MARKDOWN_NAME, folder / JSON_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(json_path, json.dumps(card, indent=2, allow_nan=False) + "\n")
        write_text_atomically(md_path, report_card_markdown(card))
    except OSError as e:
        raise UserError(f"cannot write the report card into {folder} ({e.strerror or e}): "
                        f"give a folder you can write to") from None
    return md_path, json_path
