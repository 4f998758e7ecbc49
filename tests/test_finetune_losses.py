"""Our SFT and DPO losses against TRL's, on the same batch and the transformers export of the same weights.

TRL 1.16's SFTTrainer (assistant_only_loss) and DPOTrainer tokenise the same conversations through the
exported tokenizer's chat template with their own collators, and compute_loss gives their numbers.
TrainingArguments default to bf16 autocast, so both configs turn it off: the comparison is fp32.
"""
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_export import load_with_transformers, scramble, tiny_tokenizer

from smolhub.chat import add_chat_format, fit_embeddings
from smolhub.checkpoint import load_checkpoint, save_checkpoint
from smolhub.finetune.data import PreferenceData, PreferenceLoader, SFTData, SFTLoader
from smolhub.finetune.objectives import DPOObjective, SFTObjective, sequence_logps
from smolhub_hub.export import export_checkpoint

pytest.importorskip("trl")

CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a king."},
     {"role": "assistant", "content": "Lear."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Richard, the third of that name."}],
    [{"role": "user", "content": "Reverse: a b c"}, {"role": "assistant", "content": "c b a"}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there, good friend."}],
]
PAIRS = [  # (prompt, chosen, rejected)
    ([{"role": "user", "content": "What is two plus two?"}], [{"role": "assistant", "content": "Four."}],
     [{"role": "assistant", "content": "Five, I think."}]),
    ([{"role": "user", "content": "Name a king."}], [{"role": "assistant", "content": "Lear."}],
     [{"role": "assistant", "content": "A queen."}]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b c"}],
     [{"role": "assistant", "content": "c b a"}], [{"role": "assistant", "content": "a b c"}]),
]
BETA = 0.5


@pytest.fixture(scope="module")
def chat_tokenizer():
    return add_chat_format(tiny_tokenizer())


def exported(tokenizer, folder: Path, seed: int):
    """(our model, its transformers export, the export's tokenizer) of a scrambled tiny StoryLlama whose
    embedding fits the chat tokens."""
    torch.manual_seed(seed)
    model = tiny_model("StoryLlama")
    scramble(model, seed)
    fit_embeddings(model, tokenizer)
    ckpt = save_checkpoint(folder / "run", 1, model, tokenizer, {"step": 1})
    hf, hf_tok = load_with_transformers(export_checkpoint(str(ckpt), folder / "hf", verify=False), "StoryLlama")
    return load_checkpoint(str(ckpt)).model.eval(), hf, hf_tok


@pytest.fixture(scope="module")
def policy(chat_tokenizer, tmp_path_factory):
    return exported(chat_tokenizer, tmp_path_factory.mktemp("policy"), 0)


@pytest.fixture(scope="module")
def reference(chat_tokenizer, tmp_path_factory):
    return exported(chat_tokenizer, tmp_path_factory.mktemp("reference"), 1)


def test_sft_loss_equals_trl_assistant_only_loss(chat_tokenizer, policy, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, hf, hf_tok = policy
    data = SFTData([(c, 0) for c in CONVERSATIONS], chat_tokenizer, 96)
    assert data.n_rows < len(CONVERSATIONS)  # examples share rows, so the document mask is exercised
    batch = SFTLoader(data, data.n_rows, shuffle=False).next_batch()
    with torch.no_grad():
        ours, metrics = SFTObjective(model)(model, batch)

    args = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, max_length=None,
                     per_device_train_batch_size=len(CONVERSATIONS), use_cpu=True, bf16=False, report_to="none")
    trainer = SFTTrainer(model=hf, args=args, processing_class=hf_tok,
                         train_dataset=Dataset.from_list([{"messages": c} for c in CONVERSATIONS]))
    trl_batch = next(iter(trainer.get_train_dataloader()))
    assert int((trl_batch["labels"] != -100).sum()) == data.n_targets  # the same trained tokens
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, trl_batch)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert metrics["loss"] == ours


def ours_dpo(model, objective, chat_tokenizer):
    data = PreferenceData(PAIRS, chat_tokenizer, 128)
    with torch.no_grad():
        return objective(model, PreferenceLoader(data, len(PAIRS), shuffle=False).next_batch())


def test_dpo_loss_rewards_and_margins_equal_trl(chat_tokenizer, policy, reference, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    (model, hf, hf_tok), (ref, hf_ref, _) = policy, reference
    loss, metrics = ours_dpo(model, DPOObjective(model, BETA, reference_model=ref), chat_tokenizer)

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, max_length=None,
                     per_device_train_batch_size=len(PAIRS), use_cpu=True, bf16=False, report_to="none")
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    trainer = DPOTrainer(model=hf, ref_model=hf_ref, args=args, processing_class=hf_tok,
                         train_dataset=Dataset.from_list(rows))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())))
    trl = {name: values[-1] for name, values in trainer._metrics["eval"].items()}  # an eval-mode model

    assert abs(loss.item() - 0.6931) > 0.05  # a real reference, not the trivial log 2
    torch.testing.assert_close(loss, trl_loss, rtol=0, atol=1e-5)
    for ours_name, trl_name in [("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                                ("rewards_margins", "rewards/margins"), ("rewards_accuracies", "rewards/accuracies"),
                                ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")]:
        assert metrics[ours_name].item() == pytest.approx(trl[trl_name], abs=1e-5 * max(1, abs(trl[trl_name])))
    assert 0 < metrics["rewards_accuracies"] < 1


def test_dpo_references_agree(chat_tokenizer, policy):
    """The reference as a frozen copy, as the policy with its LoRA adapters disabled, and as precomputed
    log-probabilities carried in the batch give the same loss; a trained adapter moves the policy."""
    from peft import LoraConfig, get_peft_model

    model = policy[0]
    base = tiny_model("StoryLlama", vocab_size=model.config.vocab_size)
    base.load_state_dict(model.state_dict())
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["qkv", "out"], init_lora_weights=False))
    try:
        lora.eval()
        with_copy = ours_dpo(lora, DPOObjective(lora, BETA, reference_model=base.eval()), chat_tokenizer)
        disabled = ours_dpo(lora, DPOObjective(lora, BETA, disable_adapters=lora.disable_adapter), chat_tokenizer)
        for name, value in with_copy[1].items():
            torch.testing.assert_close(disabled[1][name], value, rtol=0, atol=1e-6)
        assert abs(with_copy[1]["rewards_margins"]) > 1e-3  # the adapter changed the policy

        objective = DPOObjective(lora, BETA, disable_adapters=lora.disable_adapter)
        data = PreferenceData(PAIRS, chat_tokenizer, 128)
        data.precompute_reference(objective.reference_logps, batch_size=2)
        with torch.no_grad():
            precomputed = DPOObjective(lora, BETA)(lora, PreferenceLoader(data, len(PAIRS), shuffle=False).next_batch())
        torch.testing.assert_close(precomputed[0], with_copy[0], rtol=0, atol=1e-6)
    finally:
        lora.unload()  # the module-scoped policy goes back to its plain layers


def test_sequence_logps_are_the_labelled_tokens_log_probs(policy):
    model = policy[0]
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = labels[1, :9] = -100
    with torch.no_grad():
        logp = model(ids)[0].log_softmax(-1)
        got = sequence_logps(model, ids, labels)
    want = [sum(logp[b, t - 1, ids[b, t]] for t in range(start, 12)) for b, start in ((0, 5), (1, 9))]
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-5)


def test_moe_auxiliary_loss_is_trained_but_not_reported(chat_tokenizer):
    """As in pretraining: the balancing loss joins the backpropagated loss, the logged loss is the task's."""
    torch.manual_seed(0)
    model = tiny_model("SmolMixtral").train()
    data = SFTData([(c, 0) for c in CONVERSATIONS], chat_tokenizer, 96)
    loss, metrics = SFTObjective(model)(model, SFTLoader(data, 2).next_batch())
    aux = model.aux_loss()
    assert aux is not None and aux > 0
    torch.testing.assert_close(loss, metrics["loss"] + aux)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    model.zero_grad()
    reference = tiny_model("SmolMixtral").eval()
    batch = PreferenceLoader(PreferenceData(PAIRS, chat_tokenizer, 128), 2).next_batch()
    loss, metrics = DPOObjective(model, BETA, reference_model=reference)(model, batch)
    torch.testing.assert_close(loss, metrics["loss"] + model.aux_loss())
    loss.backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0
