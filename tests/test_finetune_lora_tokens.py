"""A LoRA run from a base without the chat format trains the rows of the chat tokens it adds (the
embedding is frozen, and the two new rows start equal, so the tied head could never prefer
<|im_end|> to <|im_start|>): only those rows and the adapters train, the head stays tied, the rows
are saved with the adapter, reload, merge and resume exactly; a push refuses an adapter checkpoint."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from smolhub.chat import IM_END, IM_START, add_chat_format, encode_prompt, fit_embeddings
from smolhub.checkpoint import fine_tuning_base, load_checkpoint, read_config
from smolhub.errors import UserError
from smolhub.finetune.engine import merge_checkpoint
from smolhub.finetune.lora import (LORA_TARGETS, add_adapter, adapters_disabled, load_adapter, lora_config, merged,
                                   save_adapter, train_new_rows)
from smolhub_hub.hub import plan_upload
from test_export import tiny_tokenizer
from test_finetune_runs import args, finetune, finetune_in_process, records, workdir  # noqa: F401 (a fixture)

ROW_DELTA = "tok_emb.parametrizations.weight.0.delta"  # the new rows' trainable delta, as named in the model


@pytest.fixture(scope="module")
def lora_run(workdir):  # noqa: F811 (the imported fixture)
    """A LoRA SFT run long enough to end its replies; its trainer and the weights before training."""
    return finetune_in_process(args(workdir, "lora", "sft.jsonl", "--lora_rank", "4", "--lr", "5e-3",
                                    "--max_steps", "80", "--eval_interval", "40", "--save_interval", "40"))


def chat_ids(tokenizer):
    return [tokenizer.convert_tokens_to_ids(t) for t in (IM_START, IM_END)]


def greedy_reply(model, tokenizer, messages, max_new_tokens=24):
    ids = encode_prompt(tokenizer, messages)
    reply = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            reply.append(int(model(torch.tensor([ids + reply]))[0][0, -1].argmax()))
            if reply[-1] == tokenizer.convert_tokens_to_ids(IM_END):
                break
    return reply


def test_only_the_new_chat_rows_and_the_adapters_train_and_the_head_stays_tied(workdir, lora_run):  # noqa: F811
    trainer, frozen, _ = lora_run
    model, tokenizer = trainer.model, trainer.sampler.tokenizer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {ROW_DELTA}
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    start, end = chat_ids(tokenizer)
    base = load_checkpoint(str(workdir / "base")).model.tok_emb.weight
    ckpt = workdir / "lora" / "ckpt-0000080"
    initial = fine_tuning_base(ckpt, read_config(ckpt)).model.tok_emb.weight  # the base, grown for the chat tokens
    with torch.no_grad():
        trained, head = model.tok_emb.weight, model.lm_head.weight
    assert torch.equal(initial[start], initial[end])  # fit_embeddings' mean row
    assert not torch.equal(trained[start], trained[end])
    assert not torch.equal(trained[start], initial[start]) and not torch.equal(trained[end], initial[end])
    others = [i for i in range(trained.size(0)) if i not in (start, end)]
    assert torch.equal(trained[others], initial[others])  # bit for bit
    kept = [i for i in others if i < base.size(0)]
    assert kept and torch.equal(trained[kept], base[kept])
    assert torch.equal(head, trained)


def test_the_trained_model_ends_its_reply_and_the_checkpoint_reloads_and_merges_exactly(workdir, lora_run):  # noqa: F811
    trainer, _, _ = lora_run
    model, tokenizer = trainer.model.eval(), trainer.sampler.tokenizer
    end = tokenizer.convert_tokens_to_ids(IM_END)
    prompt = json.loads((workdir / "sft.jsonl").read_text().splitlines()[0])["messages"][:1]
    reply = greedy_reply(model, tokenizer, prompt)
    assert reply[-1] == end and len(reply) > 1, tokenizer.decode(reply)  # some text, then the end of the turn

    ckpt = workdir / "lora" / "ckpt-0000080"
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert saved["base_model.model.tok_emb.new_token_rows.ids"].tolist() == sorted(chat_ids(tokenizer))
    assert not any(k.startswith("base_model.model.lm_head.") for k in saved)  # the tied head shares the rows
    ids = torch.randint(0, len(tokenizer), (2, 48), generator=torch.Generator().manual_seed(1))
    ids[:, 5], ids[:, 9] = chat_ids(tokenizer)
    with torch.no_grad():
        trained = model(ids)[0]
        unmerged = fine_tuning_base(ckpt, read_config(ckpt)).model.eval()
        load_adapter(unmerged, ckpt)
        torch.testing.assert_close(unmerged(ids)[0], trained, rtol=0, atol=0)
        loaded = load_checkpoint(str(ckpt)).model  # base + adapter, folded
        assert loaded.lm_head.weight is loaded.tok_emb.weight
        torch.testing.assert_close(loaded(ids)[0], trained, rtol=0, atol=1e-5)
        plain = load_checkpoint(str(merge_checkpoint(str(ckpt), str(workdir / "lora-rows-merged"), False))).model
        assert plain.lm_head.weight is plain.tok_emb.weight and not any("lora" in n for n in plain.state_dict())
        torch.testing.assert_close(plain(ids)[0], trained, rtol=0, atol=1e-5)
    assert greedy_reply(plain, tokenizer, prompt) == reply


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_save_load_and_fold_tied_or_untied(tied, tmp_path):
    """Untied, the head's rows of the new tokens train too, each table its own; with the adapters
    off (DPO's reference) the model is the base."""
    tokenizer = add_chat_format(tiny_tokenizer())
    torch.manual_seed(0)
    base = tiny_model("StoryLlama", tie_embeddings=tied)
    fit_embeddings(base, tokenizer)
    state = base.state_dict()

    def fresh():
        model = tiny_model("StoryLlama", tie_embeddings=tied, vocab_size=base.config.vocab_size)
        model.load_state_dict(state)
        return model.eval()

    model = fresh()
    add_adapter(model, lora_config(model, 4, 0.0, 0.0, LORA_TARGETS["StoryLlama"], False))
    train_new_rows(model, chat_ids(tokenizer))
    deltas = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert set(deltas) == ({ROW_DELTA} if tied else {ROW_DELTA, ROW_DELTA.replace("tok_emb", "lm_head")})
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # as if trained
    ids = torch.tensor([[0, *chat_ids(tokenizer), 7, 11, chat_ids(tokenizer)[1]]])
    with torch.no_grad():
        expected = model(ids)[0]
        with adapters_disabled(model):
            torch.testing.assert_close(model(ids)[0], fresh()(ids)[0], rtol=0, atol=0)
        save_adapter(model, tmp_path, base="unused")
        reloaded = fresh()
        load_adapter(reloaded, tmp_path)
        torch.testing.assert_close(reloaded(ids)[0], expected, rtol=0, atol=0)
        plain = merged(fresh(), tmp_path)
        assert (plain.lm_head.weight is plain.tok_emb.weight) == tied
        assert plain.state_dict().keys() == state.keys()
        torch.testing.assert_close(plain(ids)[0], expected, rtol=0, atol=1e-5)
        with pytest.raises(UserError, match="does not fit its base model"):
            load_adapter(tiny_model("StoryLlama", tie_embeddings=not tied, vocab_size=base.config.vocab_size), tmp_path)


def test_lora_resumed_from_its_checkpoint_matches_the_uninterrupted_run(workdir):  # noqa: F811
    common = ["--lora_rank", "4", "--schedule_steps", "8", "--eval_interval", "4", "--save_interval", "4",
              "--log_interval", "2", "--lr", "3e-3"]
    finetune(args(workdir, "rows-straight", "sft.jsonl", *common, "--max_steps", "8"))
    finetune(args(workdir, "rows-split", "sft.jsonl", *common, "--max_steps", "4"))
    resumed = args(workdir, "rows-split", "sft.jsonl", *common, "--max_steps", "8", "--resume")
    resumed.remove("--init_from")
    resumed.remove(str(workdir / "base"))
    finetune(resumed)
    a, b = records(workdir / "rows-straight"), records(workdir / "rows-split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 2, 4, 6, 8]
    for ra, rb in zip(a, b):
        assert ra.get("loss") == rb.get("loss") and ra.get("val_loss") == rb.get("val_loss"), (ra, rb)
    wa = load_file(str(workdir / "rows-straight" / "ckpt-0000008" / "adapter_model.safetensors"))
    wb = load_file(str(workdir / "rows-split" / "ckpt-0000008" / "adapter_model.safetensors"))
    assert "base_model.model.tok_emb.new_token_rows.delta" in wa
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_dpo_on_a_chat_checkpoint_adds_no_rows(workdir, lora_run):  # noqa: F811
    trainer, _, _ = finetune_in_process(args(workdir, "rows-dpo", "dpo.jsonl", "--method", "dpo", "--lora_rank", "4",
                                             "--init_from", str(workdir / "lora"), "--max_steps", "2"))
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    saved = load_file(str(workdir / "rows-dpo" / "ckpt-0000002" / "adapter_model.safetensors"))
    assert saved and all(".lora_" in k for k in saved)


def test_push_refuses_an_adapter_checkpoint_and_takes_the_merged_one(workdir, lora_run):  # noqa: F811
    with pytest.raises(UserError, match=r"merge it first with `python finetune\.py --merge .*`, then push the merged"):
        plan_upload(str(workdir / "lora"), "someone/StoryLlama-lora")
    merged_dir = merge_checkpoint(str(workdir / "lora"), str(workdir / "lora-push"), False)
    plan = plan_upload(str(merged_dir), "someone/StoryLlama-chat", prompts=("Hi",), max_new_tokens=4)
    assert "model.safetensors" in plan.files and "adapter_model.safetensors" not in plan.files
