"""Fine-tuning runs on the training engine (finetune.py): SFT lowers the held-out assistant loss, LoRA
trains only its adapters and merges into the same function, DPO learns held-out preferences, and
both resume exactly. A tiny StoryLlama with a 512-token BPE stands in for a pretrained base; the
data are small conversations and preference pairs generated here."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SHAKESPEARE, run_script, tiny_model
from smolhub.chat import add_chat_format, fit_embeddings, has_chat_format
from smolhub.checkpoint import fine_tuning_base, load_checkpoint, read_config, save_checkpoint
from smolhub.config import pad_vocab
from smolhub.errors import UserError
from smolhub.finetune.config import settle
from smolhub.finetune.data import PreferenceData, load_examples
from smolhub.finetune.engine import Finetuning, merge_checkpoint, parse_finetune_flags
from smolhub.finetune.lora import (LORA_TARGETS, add_adapter, has_experts, load_adapter, lora_config, merged,
                                   save_adapter)
from smolhub.finetune.objectives import sequence_logps
from smolhub.inference import load_model
from smolhub.modeling import ARCHITECTURES, model_class
from smolhub.run_dir import RunDir
from smolhub.runtime import StopSignal, setup_runtime
from smolhub.tokenizer import train_bpe
from smolhub.train import fit, setup
from StoryLlama.finetune import main as finetune
from StoryLlama.model import StoryLlama

WORDS = "apple river stone bread horse house garden window candle letter forest summer".split()
COLOURS, ANIMALS = "red blue green yellow".split(), "cat dog fox horse".split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, one_thread):
    """A base checkpoint (random tiny StoryLlama, BPE tokenizer without a chat format) and the data:
    `sft.jsonl` (repeat a word list) and `dpo.jsonl` (a colour preferred to an animal)."""
    root = tmp_path_factory.mktemp("finetune")
    text = SHAKESPEARE.read_text()
    tokenizer = train_bpe([text[i:i + 2000] for i in range(0, len(text), 2000)], 512)
    torch.manual_seed(0)
    model = tiny_model("StoryLlama", vocab_size=pad_vocab(len(tokenizer)))
    save_checkpoint(root / "base", 0, model, tokenizer, {"step": 0, "run_id": "base"})
    rng = random.Random(0)
    sft, dpo = [], []
    for _ in range(200):
        words = " ".join(rng.sample(WORDS, 3))
        sft.append({"messages": [{"role": "user", "content": f"Repeat: {words}"},
                                 {"role": "assistant", "content": words}]})
        dpo.append({"prompt": f"Name a colour for the {rng.choice(WORDS)}.", "chosen": rng.choice(COLOURS),
                    "rejected": rng.choice(ANIMALS)})
    for name, rows in (("sft", sft), ("dpo", dpo)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def args(root, out, dataset, *extra):
    return ["--init_from", str(root / "base"), "--dataset", str(root / dataset), "--out_dir", str(root / out),
            "--batch_size", "4", "--val_fraction", "0.2", "--max_steps", "20", "--warmup_steps", "2",
            "--eval_interval", "10", "--eval_batches", "4", "--log_interval", "5", "--save_interval", "10",
            "--deterministic", "--wandb_mode", "disabled", "--data_dir", str(root / "cache"), *extra]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def evaluations(out):
    return [r for r in records(out) if "val_loss" in r]


def test_sft_lowers_the_held_out_assistant_loss(workdir):
    result = finetune(args(workdir, "sft", "sft.jsonl", "--lr", "3e-3"))
    first, last = evaluations(workdir / "sft")[0], evaluations(workdir / "sft")[-1]
    assert (first["step"], last["step"]) == (0, 20) and result["val_loss"] == last["val_loss"]
    assert last["val_loss"] < 0.5 * first["val_loss"]
    ckpt = workdir / "sft" / "ckpt-0000020"
    config = read_config(ckpt)
    assert config["finetune"]["method"] == "sft" and config["finetune"]["base"] == str(
        (workdir / "base" / "ckpt-0000000").resolve())
    engine = load_model(str(workdir / "sft"), device="cpu")  # a plain checkpoint, with the chat template
    assert has_chat_format(engine.tokenizer)
    base_tokens = len(load_checkpoint(str(workdir / "base")).tokenizer)
    assert engine.model.config.vocab_size >= len(engine.tokenizer) > base_tokens


def finetune_in_process(argv):
    """finetune.py's run, driven through the engine's own setup and fit, keeping the Trainer."""
    mcfg, cfg, fcfg = parsed = parse_finetune_flags(StoryLlama, argv)
    cfg = settle(cfg, fcfg, parsed.explicit, "StoryLlama")
    stage = Finetuning(fcfg, parsed.explicit)
    rt, stop, run_dir = setup_runtime(cfg), StopSignal(), RunDir(cfg.out_dir)
    try:
        trainer = setup(StoryLlama, mcfg, cfg, rt, run_dir, stage.make_objective, parsed.explicit, stage)
        frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
        adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        fit(trainer, stop)
    finally:
        stop.restore()
        run_dir.release()
    return trainer, frozen, adapters


def test_lora_trains_only_its_adapters_and_merges_into_the_same_model(workdir):
    trainer, frozen, adapters = finetune_in_process(args(workdir, "lora", "sft.jsonl", "--lora_rank", "4"))
    model = trainer.model
    # the base has no chat format: the rows of the chat tokens it gains train too (test_finetune_lora_tokens.py)
    assert adapters and {n for n in adapters if "lora_" not in n} == {"tok_emb.parametrizations.weight.0.delta"}
    assert frozen
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # bit for bit
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)
    assert evaluations(workdir / "lora")[-1]["val_loss"] < evaluations(workdir / "lora")[0]["val_loss"]

    ckpt = workdir / "lora" / "ckpt-0000020"
    assert not (ckpt / "model.safetensors").exists()
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert saved and all(k.startswith("base_model.model.") for k in saved)
    assert {k for k in saved if ".lora_" not in k} == {"base_model.model.tok_emb.new_token_rows.ids",
                                                       "base_model.model.tok_emb.new_token_rows.delta"}
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4

    model.eval()
    ids = torch.randint(0, len(trainer.sampler.tokenizer), (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = model(ids)[0]
        unmerged = fine_tuning_base(ckpt, read_config(ckpt)).model.eval()  # base + saved adapter, as resume builds it
        load_adapter(unmerged, ckpt)
        torch.testing.assert_close(unmerged(ids)[0], trained, rtol=0, atol=0)
        merged_dir = merge_checkpoint(str(workdir / "lora"), "", overwrite=False)
        assert merged_dir == workdir / "lora-merged" / "ckpt-0000020" and (merged_dir / "model.safetensors").is_file()
        plain = load_model(str(workdir / "lora-merged"), device="cpu").model
        torch.testing.assert_close(plain(ids)[0], trained, rtol=0, atol=1e-5)
        assert not any("lora" in n for n in plain.state_dict())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lora_defaults_adapt_every_architecture_and_merge_exactly(architecture, tmp_path):
    """Each architecture's default targets exist, the MoE experts' 3-D weights take an adapter
    (peft target_parameters) or not, and merged equals unmerged."""
    torch.manual_seed(0)
    base_state = tiny_model(architecture).state_dict()
    for experts in ([True, False] if has_experts(tiny_model(architecture)) else [False]):
        model = tiny_model(architecture)
        model.load_state_dict(base_state)
        add_adapter(model, lora_config(model, 4, 0.0, 0.0, LORA_TARGETS[architecture], experts))
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)
        assert any("experts" in n for n in names) == experts
        assert {n.split(".lora_")[0].split(".")[-1] for n in names if "experts" not in n} == \
            set(LORA_TARGETS[architecture])
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)  # as if trained: B starts at zero
        ids = torch.randint(0, 320, (2, 16))
        save_adapter(model, tmp_path, base="unused")
        plain = tiny_model(architecture)
        plain.load_state_dict(base_state)
        plain = merged(plain, tmp_path)
        assert not any("lora" in n for n in plain.state_dict()) and plain.state_dict().keys() == base_state.keys()
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(ids)[0], model.eval()(ids)[0], rtol=0, atol=1e-5)


def test_dpo_learns_held_out_preferences(workdir):
    finetune(args(workdir, "dpo", "dpo.jsonl", "--method", "dpo", "--lr", "1e-3"))
    last = evaluations(workdir / "dpo")[-1]
    assert last["val_rewards_accuracies"] >= 0.9 and last["val_loss"] < 0.6 and last["val_rewards_margins"] > 0

    def accuracy(path):
        """Held-out pairs whose chosen reply the model finds likelier than the rejected one."""
        loaded = load_checkpoint(path)
        tokenizer = add_chat_format(loaded.tokenizer)
        fit_embeddings(loaded.model, tokenizer)  # the base's embeddings grow as a run's do
        _, held_out = load_examples(str(workdir / "dpo.jsonl"), "dpo", val_fraction=0.2)
        pairs = PreferenceData(held_out, tokenizer, 128)
        chosen_ids, chosen_labels, rejected_ids, rejected_labels = pairs.collate(list(range(len(pairs))))
        with torch.no_grad():
            return (sequence_logps(loaded.model, chosen_ids, chosen_labels)
                    > sequence_logps(loaded.model, rejected_ids, rejected_labels)).float().mean().item()

    before, after = accuracy(str(workdir / "base")), accuracy(str(workdir / "dpo"))
    assert after >= 0.9 and after > before + 0.2, (before, after)


@pytest.mark.parametrize("method, extra", [("sft", []), ("dpo", ["--lora_rank", "4", "--precompute_ref"])])
def test_a_run_resumed_from_its_checkpoint_matches_the_uninterrupted_one(workdir, method, extra):
    dataset = f"{method}.jsonl"
    common = ["--method", method, "--schedule_steps", "12", "--eval_interval", "6", "--save_interval", "6",
              "--log_interval", "2", "--lr", "1e-3", *extra]
    finetune(args(workdir, f"{method}-straight", dataset, *common, "--max_steps", "12"))
    finetune(args(workdir, f"{method}-split", dataset, *common, "--max_steps", "6"))
    resumed = args(workdir, f"{method}-split", dataset, *common, "--max_steps", "12", "--resume")
    resumed.remove("--init_from")
    resumed.remove(str(workdir / "base"))
    finetune(resumed)
    a, b = records(workdir / f"{method}-straight"), records(workdir / f"{method}-split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 2, 4, 6, 8, 10, 12]
    for ra, rb in zip(a, b):
        assert ra.get("loss") == rb.get("loss") and ra.get("val_loss") == rb.get("val_loss"), (ra, rb)
    weights = "adapter_model.safetensors" if extra else "model.safetensors"
    wa = load_file(str(workdir / f"{method}-straight" / "ckpt-0000012" / weights))
    wb = load_file(str(workdir / f"{method}-split" / "ckpt-0000012" / weights))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_flags_that_a_run_would_not_use_are_one_line_errors(workdir):
    with pytest.raises(UserError, match="--init_from is required"):
        finetune(["--dataset", str(workdir / "sft.jsonl")])
    with pytest.raises(UserError, match="--lora_alpha configure LoRA"):
        finetune(args(workdir, "x", "sft.jsonl", "--lora_alpha", "8"))
    with pytest.raises(UserError, match="--dpo_beta configure DPO"):
        finetune(args(workdir, "x", "sft.jsonl", "--dpo_beta", "0.5"))
    with pytest.raises(UserError, match="--lora_experts: StoryLlama has no experts"):
        finetune(args(workdir, "x", "sft.jsonl", "--lora_rank", "4", "--no_lora_experts"))
    with pytest.raises(UserError, match="holds no LoRA adapter"):
        finetune(["--merge", str(workdir / "base")])
    with pytest.raises(UserError, match="takes --out_dir and --overwrite, not --lr"):
        finetune(["--merge", str(workdir / "base"), "--lr", "1e-4"])


def test_every_model_folder_has_a_finetune_script_that_parses():
    for architecture in ARCHITECTURES:
        module = __import__(f"{architecture}.finetune", fromlist=["main"])
        _, cfg, fcfg = parsed = parse_finetune_flags(model_class(architecture),
                                                     ["--init_from", "x", "--lora_rank", "8"])
        assert fcfg.lora_targets == LORA_TARGETS[architecture]
        cfg = settle(cfg, fcfg, parsed.explicit, architecture)
        assert (cfg.lr, cfg.min_lr, cfg.out_dir) == (1e-3, 1e-4, f"out/{architecture}-lora")
        assert callable(module.main)
    shown = run_script(["finetune.py", "--help"], REPO / "StoryLlama")
    assert "--lora_rank" in shown.stdout and "--method {sft,dpo}" in shown.stdout and "5e-05" in shown.stdout
    # the data flags say what they mean to a fine-tune, not pretraining's token stream
    assert "Examples to train on" in shown.stdout and "Fraction of the examples held out" in shown.stdout
    assert "tinystories | tinyshakespeare" not in shown.stdout
