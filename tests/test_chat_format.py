"""The chat format (smolhub/chat.py): the ChatML template, its special tokens, the assistant mask,
embeddings grown to fit, and the template kept through checkpoints, the transformers export and a push."""
import copy
import fnmatch

import pytest
import torch

from conftest import GPT2_DIR, tiny_model
from smolhub.chat import (CHAT_TEMPLATE, IM_END, IM_START, add_chat_format, encode_chat, encode_prompt,
                          end_of_turn_id, fit_embeddings, has_chat_format, reply_stop_ids)
from smolhub.checkpoint import load_checkpoint, save_checkpoint
from smolhub.errors import UserError
from smolhub.generate import Engine, SamplingConfig
from smolhub.hub_download import ALLOWED_PATTERNS
from smolhub.modeling import ARCHITECTURES
from smolhub.tokenizer import EOS, gpt2_tokenizer, load_tokenizer
from test_export import load_with_transformers, scramble, tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Who is Romeo?"},
    {"role": "assistant", "content": " A Montague,\nin love."},
    {"role": "user", "content": "And Juliet?"},
    {"role": "assistant", "content": "A Capulet."},
]


@pytest.fixture(scope="module")
def bpe_base():
    """A 300-token BPE trained on Shakespeare: the tokenizer kind `--tokenizer bpe` gives."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def gpt2_base():
    return gpt2_tokenizer(str(GPT2_DIR))


@pytest.fixture(params=["bpe", "gpt2"])
def chat_tokenizer(request, bpe_base, gpt2_base):
    base = bpe_base if request.param == "bpe" else gpt2_base
    return add_chat_format(copy.deepcopy(base))


def test_template_renders_chatml(chat_tokenizer):
    text = chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (f"{EOS}<|im_start|>system\nYou answer briefly.<|im_end|>\n"
                    "<|im_start|>user\nWho is Romeo?<|im_end|>\n"
                    "<|im_start|>assistant\n A Montague,\nin love.<|im_end|>\n"
                    "<|im_start|>user\nAnd Juliet?<|im_end|>\n"
                    "<|im_start|>assistant\nA Capulet.<|im_end|>\n")
    prompt = chat_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == (f"{EOS}<|im_start|>system\nYou answer briefly.<|im_end|>\n"
                      "<|im_start|>user\nWho is Romeo?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_special_tokens_are_single_ids_added_once(kind, bpe_base, gpt2_base):
    base = bpe_base if kind == "bpe" else gpt2_base
    tok = copy.deepcopy(base)
    n = len(tok)
    assert not has_chat_format(tok) and end_of_turn_id(tok) is None and reply_stop_ids(tok) == ()
    with pytest.raises(UserError, match="no chat format"):
        encode_prompt(tok, CONVERSATION[:2])
    assert add_chat_format(tok) is tok
    start, end = tok.convert_tokens_to_ids([IM_START, IM_END])
    assert (len(tok), start, end) == (n + 2, n, n + 1)
    assert has_chat_format(tok) and end_of_turn_id(tok) == end and reply_stop_ids(tok) == (end, start)
    # never split, whatever text surrounds them; dropped by decode(skip_special_tokens=True)
    ids = tok.encode(f"x{IM_START}user\nhi{IM_END}\ny", add_special_tokens=False)
    assert ids.count(start) == 1 and ids.count(end) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "xuser\nhi\ny"
    assert tok.encode("Who is Romeo?") == base.encode("Who is Romeo?")  # ordinary text encodes as before

    add_chat_format(tok)
    assert len(tok) == n + 2 and tok.convert_tokens_to_ids([IM_START, IM_END]) == [start, end]
    assert tok.chat_template == CHAT_TEMPLATE


def test_assistant_mask_covers_exactly_the_replies(chat_tokenizer):
    """The ids and mask built by hand, piece by piece, against what the template gives."""
    tok = chat_tokenizer
    start, end = tok.convert_tokens_to_ids([IM_START, IM_END])
    ids, mask = [tok.eos_token_id], [0]
    for m in CONVERSATION:
        head = [start, *tok.encode(m["role"] + "\n", add_special_tokens=False)]
        body = [*tok.encode(m["content"], add_special_tokens=False), end]
        newline = tok.encode("\n", add_special_tokens=False)
        ids += head + body + newline
        mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body) + [0] * len(newline)
    assert encode_chat(tok, CONVERSATION) == (ids, mask)
    replies = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(replies) == f" A Montague,\nin love.{IM_END}A Capulet.{IM_END}"

    # the prompt for a reply is exactly what training saw before that reply
    prompt = encode_prompt(tok, CONVERSATION[:4])
    assert ids[:len(prompt)] == prompt and mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1


def test_bad_messages_are_user_errors(chat_tokenizer):
    for bad in ([], [{"role": "robot", "content": "hi"}], [{"role": "user"}], [{"role": "user", "content": 3}]):
        with pytest.raises(UserError, match="message|conversation"):
            encode_chat(chat_tokenizer, bad)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fit_embeddings_grows_and_keeps_old_rows(arch, tied, bpe_base):
    """A 300-row table for a 300-token BPE: the two chat tokens grow it to 320 (pad_vocab)."""
    tok = add_chat_format(copy.deepcopy(bpe_base))
    torch.manual_seed(0)
    model = tiny_model(arch, vocab_size=300, tie_embeddings=tied)
    emb, head = model.tok_emb.weight.detach().clone(), model.lm_head.weight.detach().clone()
    fit_embeddings(model, tok)
    assert model.config.vocab_size == model.tok_emb.num_embeddings == model.lm_head.out_features == 320
    assert (model.lm_head.weight is model.tok_emb.weight) == tied
    assert torch.equal(model.tok_emb.weight[:300], emb)
    torch.testing.assert_close(model.tok_emb.weight[300:], emb.mean(0).expand(20, -1), rtol=0, atol=1e-7)
    if not tied:
        assert torch.equal(model.lm_head.weight[:300], head)
        torch.testing.assert_close(model.lm_head.weight[300:], head.mean(0).expand(20, -1), rtol=0, atol=1e-7)
    ids, _ = encode_chat(tok, CONVERSATION)
    logits, _ = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), 320)
    loss = model(torch.tensor([ids[:-1]]), targets=torch.tensor([ids[1:]]))[1]
    loss.backward()
    assert model.tok_emb.weight.grad[tok.convert_tokens_to_ids(IM_END)].abs().sum() > 0

    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit_embeddings(model, tok)  # idempotent
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fit_embeddings_without_growth_sets_only_the_new_ids(gpt2_base):
    """GPT-2's 50,257 tokens pad to 50,304 rows: the chat ids fall on padding rows, which must be
    initialised all the same; the other padding rows stay as they are."""
    tok = add_chat_format(copy.deepcopy(gpt2_base))
    torch.manual_seed(0)
    model = tiny_model("StoryLlama", vocab_size=50304, tie_embeddings=False)
    emb, head = model.tok_emb.weight.detach().clone(), model.lm_head.weight.detach().clone()
    fit_embeddings(model, tok)
    assert model.config.vocab_size == 50304
    for new, old in ((model.tok_emb.weight, emb), (model.lm_head.weight, head)):
        assert torch.equal(new[:50257], old[:50257]) and torch.equal(new[50259:], old[50259:])
        torch.testing.assert_close(new[50257:50259], old[:50257].mean(0).expand(2, -1), rtol=0, atol=1e-7)


def chat_checkpoint(arch, tokenizer, out_dir, **overrides):
    """A tiny model fitted to the chat tokenizer, with scrambled weights (as if fine-tuned: the chat
    rows too), saved as a checkpoint."""
    torch.manual_seed(0)
    model = tiny_model(arch, **overrides)
    fit_embeddings(model, tokenizer)
    scramble(model, 0)
    return model, save_checkpoint(out_dir, 7, model, tokenizer, {"step": 7, "dataset": "chat.jsonl"})


def test_checkpoint_keeps_the_chat_format_and_trained_rows(bpe_base, tmp_path):
    tok = add_chat_format(copy.deepcopy(bpe_base))
    model, ckpt = chat_checkpoint("StoryLlama", tok, tmp_path / "run", vocab_size=300)
    loaded = load_checkpoint(str(ckpt))
    again = loaded.tokenizer
    assert has_chat_format(again) and again.chat_template == CHAT_TEMPLATE
    assert again.convert_tokens_to_ids([IM_START, IM_END]) == tok.convert_tokens_to_ids([IM_START, IM_END])
    assert encode_chat(again, CONVERSATION) == encode_chat(tok, CONVERSATION)
    assert loaded.model.config.vocab_size == 320
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())

    # a loaded chat tokenizer adds nothing, so fitting the loaded model keeps its (trained) chat rows
    rows = loaded.model.tok_emb.weight[300:302]
    assert not torch.allclose(rows, loaded.model.tok_emb.weight[:300].mean(0).expand(2, -1))
    assert add_chat_format(again) is again and len(again) == len(tok)
    fit_embeddings(loaded.model, again)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    assert load_tokenizer(ckpt).get_vocab() == tok.get_vocab()


def test_push_sends_and_pull_fetches_the_template(bpe_base, tmp_path):
    from smolhub_hub.hub import plan_upload

    tok = add_chat_format(copy.deepcopy(bpe_base))
    _, ckpt = chat_checkpoint("StoryLlama", tok, tmp_path / "run", vocab_size=300)
    plan = plan_upload(str(ckpt), "someone/StoryLlama-chat", prompts=("ROMEO:",), max_new_tokens=8)
    # every file save_pretrained wrote (the template's own file included) goes up, and comes down again
    assert set(plan.files) == {p.name for p in ckpt.iterdir() if p.name != "trainer_state.pt"}
    assert all(any(fnmatch.fnmatch(name, p) for p in ALLOWED_PATTERNS) for name in plan.files)
    assert "It is a chat model" in plan.card and "apply_chat_template" in plan.card


def greedy_reply(model, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Our reply to an encoded prompt: greedy, until the end of the turn (or EOS)."""
    tokens = Engine(model, tokenizer).generate_ids(
        torch.tensor([prompt]), SamplingConfig(max_new_tokens=max_new_tokens, temperature=0),
        tokenizer.eos_token_id, len(tokenizer), stop_ids=[end_of_turn_id(tokenizer)])
    return [int(t[0]) for t in tokens]


@pytest.mark.parametrize("arch", ["StoryLlama", "SmolMixtral"])
def test_transformers_export_gives_our_greedy_reply(arch, bpe_base, tmp_path):
    """apply_chat_template + generate() on the export answer as our Engine does, stopping at <|im_end|>."""
    from smolhub_hub.export import export_checkpoint, import_transformers_folder

    tok = add_chat_format(copy.deepcopy(bpe_base))
    end = end_of_turn_id(tok)
    messages = CONVERSATION[:4]
    prompt = encode_prompt(tok, messages)
    torch.manual_seed(0)
    model = tiny_model(arch, vocab_size=300, tie_embeddings=False)
    scramble(model, 0)
    fit_embeddings(model, tok)
    model.eval()
    free = greedy_reply(model, tok, prompt, 12)
    # make the reply end: where the model would say token `word`, it now ends its turn instead
    k = next(k for k in range(2, len(free)) if free[k] not in free[:k] + [end, tok.eos_token_id])
    word = free[k]
    with torch.no_grad():
        head = model.lm_head.weight
        head[[word, end]] = head[[end, word]].clone()
    reply = greedy_reply(model, tok, prompt, 12)
    assert reply == free[:k] + [end]

    ckpt = save_checkpoint(tmp_path / "run", 7, model, tok, {"step": 7})
    exported = export_checkpoint(str(ckpt), tmp_path / "hf")
    hf, hf_tok = load_with_transformers(exported, arch)
    assert hf.generation_config.eos_token_id == [tok.eos_token_id, end]
    enc = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert enc["input_ids"][0].tolist() == prompt
    out = hf.generate(**enc, max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert out == reply
    assert hf_tok.decode(out, skip_special_tokens=True) == tok.decode(free[:k])

    back = load_checkpoint(str(import_transformers_folder(exported, tmp_path / "back")))
    assert back.tokenizer.chat_template == CHAT_TEMPLATE and encode_prompt(back.tokenizer, messages) == prompt
