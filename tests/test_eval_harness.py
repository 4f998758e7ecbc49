"""lm-evaluation-harness over SmolHub checkpoints: a local multiple-choice task scores the same
per-choice log-likelihoods and accuracy through our model class as through the harness's own `hf`
backend on the transformers export; rolling log-likelihoods and generation agree likewise;
generation stops at a stop string, at EOS and at max_gen_toks; `python -m smolhub.eval` runs a
local task offline and refuses a Hub task offline in one line, in seconds."""
import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from conftest import REPO, SHAKESPEARE, script_env, tiny_model
from smolhub.checkpoint import save_checkpoint
from smolhub.eval.__main__ import EvalArgs
from smolhub.eval.harness import SmolHubLM
from smolhub.generate import Engine
from smolhub.inference import load_model
from smolhub.modeling import ARCHITECTURES
from smolhub.tokenizer import train_bpe
from smolhub_hub.export import export_checkpoint

TEXT = SHAKESPEARE.read_text()[:100_000]
TASK = "shakespeare_choice"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT[i:i + 2000] for i in range(0, len(TEXT), 2000)], 300)


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    """A tiny StoryLlama far from uniform, so that choices differ in likelihood and greedy text wanders."""
    torch.manual_seed(0)
    model = tiny_model("StoryLlama", init_std=0.1)
    meta = {"step": 1, "tokens_seen": 2048, "dataset": "tinyshakespeare"}
    return save_checkpoint(tmp_path_factory.mktemp("run"), 1, model, tokenizer, meta, trainer_state={"step": 1})


@pytest.fixture(scope="module")
def ours(checkpoint):
    return SmolHubLM(load_model(str(checkpoint), "cpu", "float32"), batch_size=3)


@pytest.fixture(scope="module")
def theirs(checkpoint, tmp_path_factory):
    """The harness's `hf` backend on the checkpoint's transformers export (a LlamaForCausalLM)."""
    folder = export_checkpoint(str(checkpoint), tmp_path_factory.mktemp("hf") / "StoryLlama", verify=False)
    return HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=2)


@pytest.fixture(scope="module")
def task_dir(tokenizer, tmp_path_factory):
    """A multiple-choice task as a user writes one: a YAML beside a JSONL of passages of the play,
    each with its true continuation among three others. One passage is longer than the model's
    context (cropped from the left), one's choices are single characters (one forward for all)."""
    folder = tmp_path_factory.mktemp("tasks")
    docs = []
    for i in range(10):
        start = 1000 + 7919 * i
        length = 600 if i == 3 else 80
        context = TEXT[start:start + length]
        true_end = TEXT[start + length:start + length + 40]
        others = [TEXT[start + 3001 * k:start + 3001 * k + 20 + 10 * k] for k in (1, 2, 3)]
        choices = others[:i % 4] + [true_end] + others[i % 4:]
        if i == 5:
            choices = ["A", "B", "C", "D"]
        docs.append({"context": context, "choices": choices, "label": i % 4})
    assert len(tokenizer.encode(docs[3]["context"])) > 128  # the tiny preset's block_size
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return folder


def run_task(lm, task_dir) -> dict:
    return simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir),
                                                                            include_defaults=False))


def test_multiple_choice_matches_the_hf_backend_on_the_export(ours, theirs, task_dir):
    a, b = run_task(ours, task_dir), run_task(theirs, task_dir)
    samples_a = sorted(a["samples"][TASK], key=lambda s: s["doc_id"])
    samples_b = sorted(b["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples_a) == len(samples_b) == 10
    for x, y in zip(samples_a, samples_b):
        ll_a, greedy_a = zip(*(r[0] for r in x["resps"]))
        ll_b, greedy_b = zip(*(r[0] for r in y["resps"]))
        assert ll_a == pytest.approx(ll_b, abs=1e-4)
        assert greedy_a == greedy_b
        assert len({round(ll, 3) for ll in ll_a}) == len(ll_a)  # the choices are told apart
        assert x["acc"] == y["acc"] and x["acc_norm"] == y["acc_norm"]
    for metric in ("acc,none", "acc_norm,none", "acc_stderr,none"):
        assert a["results"][TASK][metric] == pytest.approx(b["results"][TASK][metric])


def test_rolling_loglikelihood_matches_the_hf_backend(ours, theirs):
    """Documents of one to several context windows; each a sum of hundreds of float32 log-probabilities."""
    requests = [Instance("loglikelihood_rolling", {}, (text,), i)
                for i, text in enumerate([TEXT[:60], TEXT[500:1100], TEXT[4000:6500]])]
    assert ours.loglikelihood_rolling(requests) == pytest.approx(theirs.loglikelihood_rolling(requests), rel=1e-6)


def greedy_reference(model, tokenizer, prompt: str, n: int) -> list[int]:
    """Greedy tokens by full forwards of the whole sequence, no cache, up to EOS or n tokens."""
    ids, out = tokenizer.encode(prompt), []
    with torch.no_grad():
        while len(out) < n and (not out or out[-1] != tokenizer.eos_token_id):
            logits = model(torch.tensor([ids[-model.config.block_size:]]))[0][0, -1]
            logits[len(tokenizer):] = float("-inf")  # the embedding's padding rows are never emitted
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


def generate(lm, context: str, **gen_kwargs) -> str:
    return lm.generate_until([Instance("generate_until", {}, (context, gen_kwargs), 0)])[0]


def test_generation_stops_at_max_gen_toks_and_at_a_stop_string(ours, theirs):
    prompt = TEXT[:80]
    reference = greedy_reference(ours.model, ours.tokenizer, prompt, 40)
    assert ours.eot_token_id not in reference
    assert generate(ours, prompt, until=[], max_gen_toks=12) == ours.tokenizer.decode(reference[:12])
    full = ours.tokenizer.decode(reference)
    # a stop string the model writes inside the 40 tokens (most of what a random model writes is not text)
    stop = next(piece for piece in map(ours.tokenizer.decode, ([t] for t in reference[3:])) if piece.isalnum())
    expected = full.split(stop)[0]
    assert len(expected) < len(full)
    assert generate(ours, prompt, until=[stop], max_gen_toks=40) == expected
    requests = [Instance("generate_until", {}, (TEXT[i:i + 150], {"until": [stop, "\n\n"], "max_gen_toks": 30}), 0)
                for i in (0, 900, 2000, 2003)]
    assert ours.generate_until(requests) == theirs.generate_until(requests)


def test_generation_stops_at_eos(tokenizer):
    """An untied head whose EOS row is a large multiple of a token's row the model greedily writes:
    EOS outscores it there, if not earlier."""
    torch.manual_seed(1)
    model = tiny_model("StoryLlama", init_std=0.1, tie_embeddings=False).eval()
    prompt = TEXT[300:380]
    written = greedy_reference(model, tokenizer, prompt, 20)[5]
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 3 * model.lm_head.weight[written]
    reference = greedy_reference(model, tokenizer, prompt, 20)
    assert reference[-1] == tokenizer.eos_token_id and len(reference) <= 6
    lm = SmolHubLM(Engine(model, tokenizer), batch_size=2)
    assert generate(lm, prompt, until=["\n\n"], max_gen_toks=20) == tokenizer.decode(reference[:-1])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_scores_in_batches_as_alone_and_generates_greedily(arch, tokenizer):
    """Right padding changes nothing for any of the five (causal attention, per-token routing), and
    generation is greedy decoding of the KV-cache decoder."""
    torch.manual_seed(0)
    model = tiny_model(arch, init_std=0.1).eval()
    engine = Engine(model, tokenizer)
    requests = [Instance("loglikelihood", {}, (TEXT[i:i + 60 + 7 * i], TEXT[i + 60 + 7 * i:i + 80 + 9 * i]), i)
                for i in range(7)]
    batched = SmolHubLM(engine, batch_size=4).loglikelihood(requests)
    alone = SmolHubLM(engine, batch_size=1).loglikelihood(requests)
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in alone], abs=1e-4)
    reference = greedy_reference(model, tokenizer, TEXT[:80], 10)
    expected = tokenizer.decode(reference[:reference.index(tokenizer.eos_token_id)]
                                if tokenizer.eos_token_id in reference else reference)
    assert generate(SmolHubLM(engine), TEXT[:80], until=[], max_gen_toks=10) == expected


def offline_env(tmp_path) -> dict:
    """An unreachable Hub (a closed loopback port) and an empty Hugging Face cache."""
    return dict(script_env(tmp_path), HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))


def test_cli_runs_a_local_task_offline_and_writes_the_report_card(checkpoint, task_dir, ours, tmp_path):
    out = tmp_path / "card"
    proc = subprocess.run([sys.executable, "-m", "smolhub.eval", "--checkpoint", str(checkpoint), "--tasks", TASK,
                           "--include_path", str(task_dir), "--device", "cpu", "--out", str(out)],
                          cwd=REPO, env=offline_env(tmp_path), check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "report_card.json").read_text())
    scores = {t["metric"]: t["value"] for t in card["tasks"] if t["task"] == TASK}
    expected = run_task(ours, task_dir)["results"][TASK]
    assert scores["acc"] == pytest.approx(expected["acc,none"])
    assert scores["acc_norm"] == pytest.approx(expected["acc_norm,none"])
    assert f"{TASK}: acc" in proc.stdout


def test_cli_refuses_a_hub_task_offline_in_one_line_within_seconds(checkpoint, tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "smolhub.eval", "--checkpoint", str(checkpoint), "--tasks",
                           "hellaswag", "--device", "cpu", "--out", str(tmp_path / "card")],
                          cwd=REPO, env=offline_env(tmp_path), check=False, capture_output=True, text=True, timeout=300)
    assert time.perf_counter() - start < 60
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Hugging Face Hub" in errors[0] and "--include_path" in errors[0], proc.stderr
    assert not (tmp_path / "card").exists()


def test_cli_help_lists_every_flag():
    proc = subprocess.run([sys.executable, "-m", "smolhub.eval", "--help"], cwd=REPO, env=script_env(),
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for field in dataclasses.fields(EvalArgs):
        assert f"--{field.name}" in proc.stdout, field.name
