"""A small generated suite of instruction tasks with exact answers, and its exact-match evaluation.

Six tasks, each a one-line prompt with one right answer, generated from a seed (no data files):
  add, subtract       "What is 23 + 45?" -> "68", "What is 45 - 23?" -> "22" (numbers 0-99)
  copy                "Copy these words: apple river stone" -> "apple river stone"
  reverse             "Reverse these words: apple river stone" -> "stone river apple"
  count               "How many times does the letter r appear in the word strawberry?" -> "3"
                      (nanochat's SpellingBee, answer only)
  passage             "Tom has a red ball. Anna has a blue kite. ... What colour is Anna's kite?" -> "blue"

Each item also has a plausible wrong answer (an off-by-one sum, the words unreversed, another colour
of the passage...), which makes the preference pairs for DPO. The held-out test items come first from
their own random stream; training items are drawn from another and never repeat a test prompt.

    python -m smolhub.finetune.tasks write tasks/ --train 5000 --test 500 --seed 0
    python -m smolhub.finetune.tasks eval --checkpoint out/StoryLlama-sft            # chat template
    python -m smolhub.finetune.tasks eval --checkpoint out/StoryLlama --mode few_shot  # a base model

`write` gives sft_train/sft_test.jsonl (`messages` rows) and dpo_train/dpo_test.jsonl (`prompt`/
`chosen`/`rejected` message lists), the forms finetune.py --dataset reads. `eval` greedy-decodes the
test items and scores exact match after normalisation (case, surrounding space, trailing punctuation).
"""
from __future__ import annotations

import json
import random
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from smolhub.cli import Command, parse_command, run_main
from smolhub.config import option
from smolhub.errors import UserError
from smolhub.files import write_json, write_text_atomically

WORDS = ["apple", "river", "stone", "bread", "horse", "house", "garden", "window", "candle", "letter", "forest", "mountain", "winter", "summer", "island", "castle", "bridge", "market", "church", "school", "doctor", "sailor", "farmer", "soldier", "captain", "kitchen", "table", "chair", "basket", "bottle", "pocket", "button", "ribbon", "blanket", "pillow", "ladder", "hammer", "needle", "thread", "silver", "golden", "copper", "paper", "pencil", "ticket", "wagon", "carriage", "engine", "rocket", "planet", "comet", "valley", "meadow", "orchard", "harbor", "anchor", "rabbit", "turtle", "monkey", "parrot", "dragon", "kitten", "puppy", "spider", "beetle", "cherry", "lemon", "orange", "banana", "butter", "cheese", "pepper", "honey", "cookie", "muffin", "pickle", "potato", "tomato", "carrot", "onion", "garlic", "flower", "blossom", "branch", "leaf", "feather", "shadow", "thunder", "lightning", "rainbow", "morning", "evening", "midnight", "holiday", "journey", "mirror", "lantern", "compass", "whistle", "trumpet", "violin", "guitar", "piano", "drum", "kettle", "teapot", "saucer", "spoon", "fork", "plate", "bucket", "barrel", "cannon", "pirate", "wizard", "knight", "princess", "giant", "shepherd", "baker", "tailor", "miller", "hunter", "fisher", "merchant"]
# the counting task spells longer words, with letters that repeat
SPELLED = ["strawberry", "banana", "mississippi", "letter", "bottle", "balloon", "coffee", "committee", "success", "address", "puzzle", "pepper", "bubble", "giraffe", "yellow", "hello", "happiness", "tomorrow", "necessary", "accommodate", "possession", "occurrence", "grammar", "beginning", "cinnamon", "embarrass", "parallel", "millennium", "vacuum", "raccoon", "broccoli", "spaghetti", "umbrella", "elephant", "butterfly", "chocolate", "tennessee", "assessment", "bookkeeper", "programmer", "engineering", "referee", "toffee", "kangaroo", "cheese", "freedom", "goddess", "mattress", "carrot", "arrow", "barrel", "cotton", "kitten", "mitten", "rabbit", "summer", "winter", "dinner", "hammer", "ladder", "puppy", "muffin", "waffle", "pizza", "jazz", "fuzzy", "dizzy", "bamboo", "cookie", "noodle", "moon", "spoon", "lollipop", "peppermint", "marshmallow", "pineapple", "avocado", "potato", "tomato", "cucumber", "watermelon", "grapefruit"]
NAMES = ["Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Jack", "Emma", "Leo", "Rosa", "Max", "Nina", "Paul", "Clara", "Hugo", "Ella", "Finn", "Ivy", "Oscar", "Ruth", "Peter", "Alice", "Henry", "Grace", "Oliver", "Daisy", "Arthur", "Lily", "Felix", "Hannah"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "purple", "orange", "pink", "grey"]
OBJECTS = ["ball", "kite", "hat", "cup", "book", "box", "bag", "coat", "boat", "bike", "drum", "lamp", "pen", "scarf", "shoe", "sock", "bell", "key", "ring", "clock"]

TASKS = ("add", "subtract", "copy", "reverse", "count", "passage")


@dataclass(frozen=True)
class TaskItem:
    task: str
    prompt: str
    answer: str
    wrong: str  # a plausible wrong answer: the rejected side of the preference pair


def _add(rng: random.Random) -> TaskItem:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return TaskItem("add", f"What is {a} + {b}?", str(a + b), str(_near_miss(rng, a + b)))


def _subtract(rng: random.Random) -> TaskItem:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return TaskItem("subtract", f"What is {a} - {b}?", str(a - b), str(_near_miss(rng, a - b)))


def _near_miss(rng: random.Random, n: int) -> int:
    """A wrong result of the kind a model makes: off by one or two, or by ten (a carry)."""
    return rng.choice([m for m in (n - 10, n - 2, n - 1, n + 1, n + 2, n + 10) if m >= 0])


def _words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 5))


def _copy(rng: random.Random) -> TaskItem:
    words = _words(rng)
    i = rng.randrange(len(words) - 1)
    swapped = words[:i] + [words[i + 1], words[i]] + words[i + 2:]
    return TaskItem("copy", f"Copy these words: {' '.join(words)}", " ".join(words), " ".join(swapped))


def _reverse(rng: random.Random) -> TaskItem:
    words = _words(rng)
    return TaskItem("reverse", f"Reverse these words: {' '.join(words)}", " ".join(reversed(words)), " ".join(words))


def _count(rng: random.Random) -> TaskItem:
    word = rng.choice(SPELLED if rng.random() < 0.5 else WORDS)
    present = sorted(set(word))
    repeated = [c for c in present if word.count(c) > 1]
    # answers spread over 0..4 rather than mostly 1: letters that repeat are favoured, absent ones asked too
    r = rng.random()
    if r < 0.15:
        letter = rng.choice([c for c in string.ascii_lowercase if c not in present])
    else:
        letter = rng.choice(repeated if repeated and r < 0.6 else present)
    n = word.count(letter)
    wrong = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
    return TaskItem("count", f"How many times does the letter {letter} appear in the word {word}?", str(n), str(wrong))


def _passage(rng: random.Random) -> TaskItem:
    k = rng.randint(2, 4)
    people, colours, things = rng.sample(NAMES, k), rng.sample(COLOURS, k), rng.sample(OBJECTS, k)
    story = " ".join(f"{p} has a {c} {t}." for p, c, t in zip(people, colours, things))
    i = rng.randrange(k)
    j = rng.choice([x for x in range(k) if x != i])  # the wrong answer is another one of the story's
    if rng.random() < 0.5:
        return TaskItem("passage", f"{story} What colour is {people[i]}'s {things[i]}?", colours[i], colours[j])
    return TaskItem("passage", f"{story} Who has the {colours[i]} {things[i]}?", people[i], people[j])


GENERATORS: dict[str, Callable[[random.Random], TaskItem]] = {
    "add": _add, "subtract": _subtract, "copy": _copy, "reverse": _reverse, "count": _count, "passage": _passage}


def _draw(rng: random.Random, n: int, exclude: set[str], unique: bool) -> list[TaskItem]:
    """n items, the tasks in turn, none with a prompt in `exclude` (and, if unique, no prompt twice).
    The first m of n are the m items a smaller n gives, so a set grows without changing the items it had."""
    items: list[TaskItem] = []
    seen = set(exclude)
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        for _ in range(1000):
            item = GENERATORS[task](rng)
            if item.prompt not in seen:
                break
        else:
            raise UserError(f"the {task} task has no more new prompts after {i} items: ask for fewer test items")
        if unique:
            seen.add(item.prompt)
        items.append(item)
    return items


def make_suite(n_train: int, n_test: int, seed: int = 0) -> tuple[list[TaskItem], list[TaskItem]]:
    """(train, test) items. The test items depend only on (n_test, seed) and are all different; the
    train items never share a prompt with them, and may repeat one another (the counting task has a
    few thousand distinct questions)."""
    if n_train < 0 or n_test < 0:
        raise UserError(f"--train and --test must be >= 0, got {n_train} and {n_test}")
    test = _draw(random.Random(f"smolhub-tasks-test-{seed}"), n_test, set(), unique=True)
    train = _draw(random.Random(f"smolhub-tasks-train-{seed}"), n_train, {item.prompt for item in test}, unique=False)
    return train, test


def sft_row(item: TaskItem) -> dict:
    return {"messages": [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": item.answer}]}


def dpo_row(item: TaskItem) -> dict:
    """TRL's conversational preference form with an explicit prompt."""
    return {"prompt": [{"role": "user", "content": item.prompt}],
            "chosen": [{"role": "assistant", "content": item.answer}],
            "rejected": [{"role": "assistant", "content": item.wrong}]}


def write_suite(folder: str | Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, Path]:
    """Write sft_train/sft_test/dpo_train/dpo_test.jsonl into folder; returns their paths."""
    train, test = make_suite(n_train, n_test, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, items in (("train", train), ("test", test)):
        for kind, row in (("sft", sft_row), ("dpo", dpo_row)):
            paths[f"{kind}_{split}"] = folder / f"{kind}_{split}.jsonl"
            write_text_atomically(paths[f"{kind}_{split}"], "".join(json.dumps(row(item)) + "\n" for item in items))
    return paths


def normalize(text: str) -> str:
    """What exact match compares: lowercase, single spaces, no surrounding space or trailing punctuation."""
    return " ".join(text.lower().split()).rstrip(".,;:!?").strip()


def few_shot_prompt(item: TaskItem, shots: list[TaskItem]) -> str:
    """Plain-text Q/A pairs for a base model, ending where the answer starts (answers end at a newline)."""
    solved = "".join(f"Q: {s.prompt}\nA: {s.answer}\n\n" for s in shots)
    return f"{solved}Q: {item.prompt}\nA:"


def _bucket(n: int) -> int:
    """The next power of two: batches padded to these sizes reuse a handful of CUDA-graph decoders."""
    return 1 << (n - 1).bit_length()


@torch.inference_mode()
def greedy_continuations(engine, tokenizer, prompts: list[list[int]], stop_ids: set[int], max_new_tokens: int,
                         batch_size: int) -> list[list[int]]:
    """Each prompt's greedy continuation, cut before its first stop token. Prompts of equal length
    share a batch (the engine decodes rows of one length)."""
    from smolhub.generate import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    device = next(engine.model.parameters()).device
    eos = tokenizer.eos_token_id
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for idxs in by_len.values():
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start:start + batch_size]
            rows = [prompts[i] for i in chunk]
            rows += [rows[-1]] * (min(_bucket(len(rows)), batch_size) - len(rows))
            steps = list(engine.generate_ids(torch.tensor(rows, device=device), cfg, eos, len(tokenizer), stop_ids))
            for i, row in zip(chunk, torch.stack(steps, dim=1).tolist()):
                out[i] = row[:next((k for k, t in enumerate(row) if t in stop_ids or t == eos), len(row))]
    return out


def evaluate_exact_match(model, tokenizer, items: list[TaskItem], mode: Literal["chat", "few_shot"] = "chat",
                         shots: int = 3, examples: list[TaskItem] | None = None, max_new_tokens: int = 32,
                         batch_size: int = 64) -> dict:
    """Greedy-decode every item and score exact match (after `normalize`): per task, overall, and
    each item's output.

    model: an Engine (load_model's) or a bare model, used with `tokenizer` (None = the engine's); it is
    put in eval mode.
    chat: the user turn through the chat template; the reply ends at the end-of-turn token.
    few_shot: `shots` solved items of the same task from `examples` (the training items) as plain
    Q/A text before the question; the answer ends at a newline. For a base model without chat format."""
    from smolhub.generate import Engine

    engine = model if isinstance(model, Engine) else Engine(model, tokenizer)
    tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
    engine.model.eval()
    if mode == "chat":
        from smolhub.chat import encode_prompt, end_of_turn_id, has_chat_format

        if not has_chat_format(tokenizer):
            raise UserError("this checkpoint's tokenizer has no chat template (a base model): evaluate it with "
                            "--mode few_shot, or fine-tune it first")
        stops = {end_of_turn_id(tokenizer)}
        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": item.prompt}]) for item in items]
    elif mode == "few_shot":
        pool: dict[str, list[TaskItem]] = {}
        for ex in examples or []:
            pool.setdefault(ex.task, []).append(ex)
        missing = sorted({item.task for item in items if len(pool.get(item.task, [])) < shots})
        if missing:
            raise UserError(f"few-shot prompting needs {shots} solved examples of each task; too few for {missing}")
        # the answer ends at the line's end; a token holding a newline after some text is cut below
        stops = {ids[0] for ids in (tokenizer.encode(nl, add_special_tokens=False) for nl in ("\n", "\n\n"))
                 if len(ids) == 1}
        prompts = [[tokenizer.eos_token_id] + tokenizer.encode(few_shot_prompt(item, pool[item.task][:shots]),
                                                               add_special_tokens=False) for item in items]
    else:
        raise UserError(f"mode must be chat or few_shot, got {mode!r}")
    outputs = [tokenizer.decode(ids) for ids in greedy_continuations(engine, tokenizer, prompts, stops,
                                                                     max_new_tokens, batch_size)]
    if mode == "few_shot":
        outputs = [text.split("\n")[0] for text in outputs]
    per_task: dict[str, dict] = {}
    scored = []
    for item, output in zip(items, outputs):
        ok = normalize(output) == normalize(item.answer)
        stats = per_task.setdefault(item.task, {"n": 0, "correct": 0})
        stats["n"] += 1
        stats["correct"] += ok
        scored.append({"task": item.task, "prompt": item.prompt, "answer": item.answer, "output": output,
                       "correct": ok})
    for stats in per_task.values():
        stats["accuracy"] = stats["correct"] / stats["n"]
    correct = sum(s["correct"] for s in per_task.values())
    return {"mode": mode, "shots": shots if mode == "few_shot" else 0, "n": len(items), "correct": correct,
            "accuracy": correct / len(items) if items else 0.0,
            "tasks": {task: per_task[task] for task in TASKS if task in per_task}, "items": scored}


def results_table(results: dict) -> str:
    lines = ["| task | n | correct | exact match |", "|---|---|---|---|"]
    for task, s in results["tasks"].items():
        lines.append(f"| {task} | {s['n']} | {s['correct']} | {s['accuracy']:.1%} |")
    lines.append(f"| **all** | {results['n']} | {results['correct']} | **{results['accuracy']:.1%}** |")
    return "\n".join(lines)


@dataclass
class HeldOutArgs:
    test: int = option(500, "Held-out test items; no training item repeats one of their prompts.")
    seed: int = option(0, "Seed of the suite: the same seed and sizes give the same items.")


@dataclass
class SuiteArgs(HeldOutArgs):
    train: int = option(5000, "Training items (the tasks in turn).")


@dataclass
class WriteArgs:
    folder: str = field(metadata={"help": "Folder for sft_train/sft_test/dpo_train/dpo_test.jsonl.", "positional": True})


@dataclass
class EvalArgs:
    checkpoint: str = option("", "Checkpoint folder, a run's out_dir (newest checkpoint) or a Hub repo id.",
                             required=True)
    mode: Literal["auto", "chat", "few_shot"] = option(
        "auto", "chat: the prompt through the chat template; few_shot: solved examples as plain text (a base "
        "model); auto = chat when the checkpoint has a chat template.")
    shots: int = option(3, "Solved examples per prompt in few_shot mode (from the training items).")
    max_new_tokens: int = option(32, "Longest answer decoded.")
    batch_size: int = option(64, "Prompts decoded together.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option("auto", "Weights dtype; auto = bf16 on CUDA.")
    out: str = option("", "JSON file for the results (default: tasks_<mode>.json in the checkpoint's folder).")


COMMANDS = {
    "write": Command((WriteArgs, SuiteArgs), help="Write the suite as JSONL for finetune.py --dataset."),
    "eval": Command((EvalArgs, HeldOutArgs), help="Exact match of a checkpoint on the held-out items.",
                    description="Greedy-decode the suite's held-out items (the same --test and --seed as `write` "
                    "give the same items) and print per-task exact match."),
}


def main(argv: list[str] | None = None) -> dict | None:
    command, (args, suite) = parse_command(COMMANDS, argv, prog="python -m smolhub.finetune.tasks",
                                           description="A generated suite of instruction tasks with exact answers.")
    if command == "write":
        paths = write_suite(args.folder, suite.train, suite.test, suite.seed)
        print(f"wrote {suite.train} train and {suite.test} test items: " + ", ".join(str(p) for p in paths.values()))
        return None
    if args.shots < 0 or args.max_new_tokens <= 0 or args.batch_size <= 0:
        raise UserError("--shots must be >= 0, --max_new_tokens and --batch_size positive")
    if suite.test <= 0:
        raise UserError(f"--test must be positive to evaluate, got {suite.test}")
    from smolhub.chat import has_chat_format
    from smolhub.inference import load_model

    engine = load_model(args.checkpoint, args.device, args.dtype)
    mode = args.mode if args.mode != "auto" else "chat" if has_chat_format(engine.tokenizer) else "few_shot"
    # the first training items are the same whatever --train is, so the shots are those `write` wrote
    examples, test = make_suite(args.shots * len(TASKS), suite.test, suite.seed)
    results = evaluate_exact_match(engine, None, test, mode, args.shots, examples, args.max_new_tokens,
                                   args.batch_size)
    results.update(checkpoint=str(engine.path), seed=suite.seed)
    out = Path(args.out) if args.out else Path(engine.path) / f"tasks_{mode}.json"
    write_json(out, results, indent=1)
    print(results_table(results))
    print(f"results written to {out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    run_main(main)
