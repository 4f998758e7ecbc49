"""The model card (README.md) pushed with a checkpoint: what it is, how it was trained, how to use it."""
from __future__ import annotations

import json
from pathlib import Path

SAMPLE_PROMPTS = ("Once upon a time", "The little dog", "One day, a girl named Lily")


def read_metrics(out_dir: Path) -> list[dict]:
    """The run's metrics.jsonl (one object per logged step), or [] when the checkpoint has none beside it."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill mid-write
            continue
    return records


def _last(records: list[dict], key: str):
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _dataset_line(dataset: str | None) -> tuple[str, str | None]:
    """(how the card names the dataset, its Hub id for the card's metadata or None)."""
    from smolhub.data.sources import HUB_DATASETS

    if not dataset:
        return "not recorded", None
    if dataset in HUB_DATASETS:
        repo, config, _ = HUB_DATASETS[dataset]
        name = f"[{repo}](https://huggingface.co/datasets/{repo})" + (f" ({config})" if config else "")
        return name, repo
    if dataset in ("synthetic", "tinyshakespeare"):
        return dataset, None
    return f"a local corpus ({Path(dataset).name})", None


def report_card_table(markdown: str) -> str:
    """The table of a report_card.md (smolhub.eval.report), without its heading."""
    return "\n".join(line for line in markdown.splitlines() if line.startswith("|"))


def model_card(repo_id: str, config: dict, params: int, active_params: int, n_tokens: int, metrics: list[dict],
               samples: list[tuple[str, str]], sampling: str, has_curve: bool, remote_code: bool,
               evaluation: str = "", chat: bool = False) -> str:
    """remote_code: whether the transformers export carries its own modelling code (trust_remote_code=True);
    evaluation: the checkpoint's report card table (report_card_table), if it has one;
    chat: whether its tokenizer has the chat format (smolhub.chat.has_chat_format)."""
    arch, meta = config["architecture"], config.get("meta", {})
    dataset, dataset_repo = _dataset_line(meta.get("dataset"))
    val_loss = meta.get("val_loss") if meta.get("val_loss") is not None else _last(metrics, "val_loss")
    train_loss = _last(metrics, "loss")
    tokens = meta.get("tokens_seen") if meta.get("tokens_seen") is not None else _last(metrics, "tokens")
    remote = ", trust_remote_code=True" if remote_code else ""
    front = ["---", "pipeline_tag: text-generation", "tags:", "- smolhub", f"- {arch.lower()}", "- text-generation"]
    if dataset_repo:
        front += ["datasets:", f"- {dataset_repo}"]
    front.append("---")
    lines = [*front, "", f"# {repo_id.split('/')[-1]}", "",
             f"A {arch} language model trained from scratch with SmolHub (`{arch}/` in its repository).", "",
             *([("It is a chat model: its tokenizer carries a ChatML chat template (`<|im_start|>` ... "
                 "`<|im_end|>`), so `tokenizer.apply_chat_template` builds its prompts, and a reply ends at "
                 "`<|im_end|>`."), ""] if chat else []),
             "| | |", "|---|---|",
             f"| architecture | {arch} |",
             f"| parameters | {_millions(params)} total, {_millions(active_params)} active per token |",
             f"| vocabulary | {n_tokens:,} tokens (embedding padded to {config['model']['vocab_size']:,} rows) |",
             f"| dataset | {dataset} |"]
    if meta.get("step") is not None:
        lines.append(f"| training steps | {meta['step']:,} |")
    if tokens is not None:
        lines.append(f"| tokens seen | {tokens:,} |")
    if val_loss is not None:
        lines.append(f"| final validation loss | {val_loss:.4f} nats/token |")
    if train_loss is not None:
        lines.append(f"| final training loss | {train_loss:.4f} nats/token |")
    lines += ["", "Model configuration (`config.json`):", "", "```json", json.dumps(config["model"], indent=2),
              "```", ""]
    if evaluation:
        lines += ["## Evaluation", "", evaluation, "", "The same numbers are in `report_card.json`.", ""]
    if has_curve:
        lines += ["## Training curve", "", "![loss curve](loss_curve.png)", ""]
    if samples:
        lines += ["## Samples", "", f"Generated when this card was written ({sampling}):", ""]
        for prompt, completion in samples:
            lines += ["```text", prompt + completion, "```", ""]
    lines += ["## Use it", "", "With SmolHub installed (`pip install -e .` in its repository):", "", "```python",
              "from smolhub.inference import load_model, generate_text", "",
              f'model = load_model("{repo_id}")', 'print(generate_text(model=model, prompt="Once upon a time", '
              'max_length=100, temperature=0.7))', "```", "", "```bash",
              f"python {arch}/inference.py --checkpoint {repo_id} --prompt \"Once upon a time\"",
              *([f"python {arch}/inference.py --checkpoint {repo_id} --chat           # talk to it"] if chat else []),
              f"python {arch}/trainer.py --init_from {repo_id}        # fine-tune from these weights",
              f"python -m smolhub_hub pull {repo_id} local/{arch}      # a local copy",
              "```", "", "With plain `transformers`, export it first:", "", "```bash",
              f"python -m smolhub_hub export {repo_id} {arch}-hf", "```", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{arch}-hf"{remote})',
              f'tokenizer = AutoTokenizer.from_pretrained("{arch}-hf"{remote})', "```", ""]
    if chat:
        lines += ["```python", 'messages = [{"role": "user", "content": "Tell me a story."}]',
                  "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                  "return_dict=True)",
                  "reply = model.generate(**prompt, max_new_tokens=100)[0, prompt[\"input_ids\"].size(1):]",
                  "print(tokenizer.decode(reply, skip_special_tokens=True))", "```", ""]
    return "\n".join(lines)
