"""The generated instruction suite (smolhub.finetune.tasks): seeded and split without overlap, right
answers (recomputed here from the prompts), files that the fine-tuning data loader reads, and exact
match scored through a real Engine against greedy decoding written out here, on a tiny model that
learned some of the items."""
import itertools
import json
import re

import pytest
import torch

from conftest import GPT2_DIR, SHAKESPEARE, tiny_model
from smolhub.errors import UserError
from smolhub.finetune import tasks
from smolhub.finetune.tasks import TASKS, TaskItem, make_suite, normalize


def test_suite_is_deterministic_by_seed():
    train, test = make_suite(60, 30, seed=3)
    assert (train, test) == make_suite(60, 30, seed=3)
    other_train, other_test = make_suite(60, 30, seed=4)
    assert [i.prompt for i in other_test] != [i.prompt for i in test]
    assert [i.prompt for i in other_train] != [i.prompt for i in train]
    # a larger suite keeps the smaller one's items first: eval's few-shot examples are write's first items
    bigger_train, bigger_test = make_suite(200, 30, seed=3)
    assert bigger_train[:60] == train and bigger_test == test
    assert make_suite(60, 50, seed=3)[1][:30] == test


def test_train_and_test_are_disjoint_and_every_task_is_there():
    train, test = make_suite(3000, 600, seed=0)
    test_prompts = [i.prompt for i in test]
    assert len(set(test_prompts)) == len(test)
    assert not set(test_prompts) & {i.prompt for i in train}
    for items in (train, test):
        counts = {task: sum(i.task == task for i in items) for task in TASKS}
        assert counts == dict.fromkeys(TASKS, len(items) // len(TASKS))


def expected_answer(item: TaskItem) -> str:
    """The answer, worked out from the prompt's text alone."""
    if item.task in ("add", "subtract"):
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", item.prompt).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    if item.task in ("copy", "reverse"):
        words = item.prompt.split(": ", 1)[1].split()
        return " ".join(words if item.task == "copy" else words[::-1])
    if item.task == "count":
        letter, word = re.fullmatch(r"How many times does the letter (\w) appear in the word (\w+)\?",
                                    item.prompt).groups()
        return str(word.count(letter))
    facts = re.findall(r"(\w+) has a (\w+) (\w+)\.", item.prompt)
    asked = re.search(r"What colour is (\w+)'s (\w+)\?$", item.prompt)
    if asked:
        return next(colour for name, colour, thing in facts if (name, thing) == asked.groups())
    colour, thing = re.search(r"Who has the (\w+) (\w+)\?$", item.prompt).groups()
    return next(name for name, c, t in facts if (c, t) == (colour, thing))


def test_answers_are_right_and_rejected_answers_wrong():
    train, test = make_suite(1200, 300, seed=1)
    for item in train + test:
        assert item.answer == expected_answer(item), item
        assert normalize(item.wrong) != normalize(item.answer), item
    subtractions = [i for i in test if i.task == "subtract"]
    assert all(int(i.answer) >= 0 for i in subtractions)
    assert {i.answer for i in test if i.task == "count"} >= {"0", "1", "2"}


@pytest.mark.parametrize("text,expected", [
    ("  Blue.", "blue"), ("68\n", "68"), ("Stone  river APPLE!", "stone river apple"), ("Tom?!", "tom"),
    ("3.5", "3.5"), ("", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_written_files_load_through_the_fine_tuning_loader(tmp_path):
    from smolhub.chat import add_chat_format
    from smolhub.finetune.data import SFTData, load_examples
    from smolhub.tokenizer import gpt2_tokenizer

    tasks.main(["write", str(tmp_path), "--train", "40", "--test", "12", "--seed", "5"])
    train, test = make_suite(40, 12, seed=5)
    for split, items in (("train", train), ("test", test)):
        sft, held_out = load_examples(str(tmp_path / f"sft_{split}.jsonl"), "sft", val_fraction=0)
        assert held_out == [] and len(sft) == len(items)
        assert [m[0][-1]["content"] for m in sft] == [i.answer for i in items]
        pairs, _ = load_examples(str(tmp_path / f"dpo_{split}.jsonl"), "dpo", val_fraction=0)
        assert [(p[0]["content"], c[-1]["content"], r[-1]["content"]) for p, c, r in pairs] == \
            [(i.prompt, i.answer, i.wrong) for i in items]
    data = SFTData(sft, add_chat_format(gpt2_tokenizer(str(GPT2_DIR))), block_size=256)
    assert data.n_examples == 12 and data.truncated == 0 and data.skipped == 0


# --- exact match through a real Engine ---------------------------------------------------------

LEARNED = make_suite(6, 0, seed=9)[0]  # one item of each task, which the tiny model is trained to answer


@pytest.fixture(scope="module")
def chat_model(one_thread):
    """A tiny StoryLlama with the chat format, trained on LEARNED until it answers them."""
    from smolhub.chat import add_chat_format, encode_chat, fit_embeddings
    from smolhub.tokenizer import train_bpe

    with open(SHAKESPEARE, encoding="utf-8") as f:
        tokenizer = add_chat_format(train_bpe(list(itertools.islice(f, 400)), 320))
    torch.manual_seed(0)
    model = tiny_model("StoryLlama", block_size=512)  # room for few-shot prompts in a 320-token BPE
    fit_embeddings(model, tokenizer)
    rows = []
    for item in LEARNED:
        ids, mask = encode_chat(tokenizer, tasks.sft_row(item)["messages"])
        targets = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
        rows.append((torch.tensor([ids[:-1]]), torch.tensor([targets])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = sum(model(x, y)[1] for x, y in rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def reference_reply(model, tokenizer, ids: list[int], stops: set[int], max_new_tokens: int) -> str:
    """Greedy decoding of one prompt, written out: the whole sequence through the model for each token."""
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + out]))[0][0, -1, :len(tokenizer)]
            token = int(logits.argmax())
            if token in stops:
                break
            out.append(token)
    return tokenizer.decode(out)


def test_exact_match_scores_what_greedy_decoding_answers(chat_model):
    from smolhub.chat import encode_prompt, end_of_turn_id
    from smolhub.generate import Engine

    model, tokenizer = chat_model
    unseen = make_suite(0, 12, seed=9)[1]
    items = LEARNED + unseen
    stops = {end_of_turn_id(tokenizer), tokenizer.eos_token_id}
    replies = [reference_reply(model, tokenizer, encode_prompt(tokenizer, [{"role": "user", "content": i.prompt}]),
                               stops, 32) for i in items]
    expected = [normalize(r) == normalize(i.answer) for r, i in zip(replies, items)]
    assert all(expected[:len(LEARNED)]), replies[:len(LEARNED)]  # the model learned its items
    results = tasks.evaluate_exact_match(Engine(model, tokenizer), None, items, "chat", max_new_tokens=32,
                                         batch_size=4)
    assert [r["output"] for r in results["items"]] == replies
    assert [r["correct"] for r in results["items"]] == expected
    assert results["correct"] == sum(expected) and results["accuracy"] == sum(expected) / len(items)
    for task in TASKS:
        mine = [ok for ok, i in zip(expected, items) if i.task == task]
        assert results["tasks"][task] == {"n": len(mine), "correct": sum(mine), "accuracy": sum(mine) / len(mine)}

    # every item given the model's own reply as its answer: a model that is always right scores 100%
    agreeing = [TaskItem(i.task, i.prompt, r, i.wrong) for i, r in zip(items, replies)]
    assert tasks.evaluate_exact_match(model, tokenizer, agreeing, "chat", max_new_tokens=32)["accuracy"] == 1.0


def test_few_shot_prompts_solved_examples_and_stops_at_the_line_end(chat_model):
    model, tokenizer = chat_model
    examples, items = make_suite(12, 6, seed=2)
    results = tasks.evaluate_exact_match(model, tokenizer, items, "few_shot", shots=2, examples=examples,
                                         max_new_tokens=10)
    newline = set(tokenizer.encode("\n", add_special_tokens=False)) | {tokenizer.eos_token_id}
    for item, scored in zip(items, results["items"]):
        shots = [e for e in examples if e.task == item.task][:2]
        prompt = tasks.few_shot_prompt(item, shots)
        assert prompt.startswith(f"Q: {shots[0].prompt}\nA: {shots[0].answer}\n\n") and prompt.endswith(
            f"Q: {item.prompt}\nA:")
        ids = [tokenizer.eos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        assert scored["output"] == reference_reply(model, tokenizer, ids, newline, 10).split("\n")[0]
    with pytest.raises(UserError, match="few-shot prompting needs 3 solved examples"):
        tasks.evaluate_exact_match(model, tokenizer, items, "few_shot", shots=3, examples=examples[:6])


def test_eval_command_writes_the_table_and_json(chat_model, tmp_path, capsys):
    from smolhub.checkpoint import save_checkpoint

    model, tokenizer = chat_model
    ckpt = save_checkpoint(tmp_path / "run", 60, model, tokenizer, {"step": 60})
    out = tmp_path / "scores.json"
    returned = tasks.main(["eval", "--checkpoint", str(ckpt), "--test", "12", "--seed", "9", "--max_new_tokens", "12",
                           "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(returned)) and saved["mode"] == "chat" and saved["n"] == 12
    direct = tasks.evaluate_exact_match(model, tokenizer, make_suite(0, 12, seed=9)[1], "chat", max_new_tokens=12)
    assert saved["correct"] == direct["correct"]
    table = capsys.readouterr().out
    assert "| **all** | 12 |" in table and all(f"| {t} |" in table for t in TASKS)


def test_chat_mode_needs_a_chat_template():
    from smolhub.tokenizer import train_bpe

    with open(SHAKESPEARE, encoding="utf-8") as f:
        tokenizer = train_bpe(list(itertools.islice(f, 200)), 300)
    with pytest.raises(UserError, match="no chat template"):
        tasks.evaluate_exact_match(tiny_model("StoryLlama"), tokenizer, make_suite(0, 6)[1], "chat")


def test_posttrain_benchmark_runs_every_stage_end_to_end(tmp_path):
    """benchmarks/posttrain.py at toy size on CPU: pretraining, the suite, and every fine-tuning stage
    through finetune.py (an MoE model, so LoRA with and without the experts), each scored."""
    from benchmarks import posttrain

    out = tmp_path / "out"
    report = posttrain.main(["--toy", "--data", str(SHAKESPEARE), "--models", "SmolMixtral", "--pretrain_steps", "4",
                             "--train_items", "300", "--test_items", "12", "--sft_steps", "3", "--dpo_steps", "2",
                             "--ft_batch_size", "1", "--shots", "1", "--max_new_tokens", "4", "--eval_batch_size", "8",
                             "--lora_rank", "4", "--num_proc", "1", "--device", "cpu", "--out", str(out)])
    saved = json.loads((out / "posttrain.json").read_text())
    assert saved == json.loads(json.dumps(report))
    rows = {r["stage"]: r for r in saved["rows"]}
    assert list(rows) == ["base", "sft", "lora", "lora_experts", "dpo"]
    assert rows["base"]["mode"] == "few_shot" and {r["mode"] for r in saved["rows"][1:]} == {"chat"}
    assert rows["base"]["train_tokens"] == 4 * 16 * 128  # the tiny preset's 16 x 128-token batches
    for stage, row in rows.items():
        assert 0 <= row["accuracy"] <= 1 and set(row["tasks"]) == set(TASKS) and len(row["items"]) == 12
        assert row["train_tokens"] > 0 and row["train_minutes"] > 0 and "val_loss" in row["val"]
    assert rows["dpo"]["from"] == "sft"
    targets = {}
    for stage in ("lora", "lora_experts"):
        adapter, = (out / f"SmolMixtral-{stage}").glob("*/adapter_config.json")
        targets[stage] = json.loads(adapter.read_text()).get("target_parameters")
    assert not targets["lora"] and targets["lora_experts"]
    table = (out / "posttrain.md").read_text()
    assert table.count("| SmolMixtral |") == 5 and "python -m benchmarks.posttrain --toy" in table
