"""The chat format: ChatML turns in the tokenizer's chat template, and embeddings that fit its tokens.

A conversation is one document, so it starts with the end-of-text token that separates documents
in pretraining; then each message is

    <|im_start|>{role}\\n{content}<|im_end|>\\n

and a prompt for a reply ends with `<|im_start|>assistant\\n`. The template lives in the tokenizer
(the transformers convention), so `tokenizer.apply_chat_template` gives the same ids on our
checkpoints and on their transformers export. Assistant content and its `<|im_end|>` sit inside
`{% generation %}`, which is how transformers (and TRL's assistant-only loss) find the tokens a
model is trained to produce.
"""
from __future__ import annotations

import torch
from torch import nn

from smolhub.config import pad_vocab
from smolhub.errors import UserError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ eos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Ids that add_chat_format added to a tokenizer object, whose embedding rows fit_embeddings must
# initialise. A tokenizer loaded with the chat tokens already in it came with a model whose rows
# were initialised (and maybe trained) when they were added, so it carries none.
_ADDED_IDS = "_smolhub_added_chat_ids"


def _added_id(tokenizer, token: str) -> int | None:
    """The id of `token` if it is one of the tokenizer's added tokens, which are never split.
    (added_tokens_encoder holds a handful of entries; get_vocab() would copy all 50k of GPT-2's.)"""
    return tokenizer.added_tokens_encoder.get(token)


def has_chat_format(tokenizer) -> bool:
    """Whether the tokenizer has a chat template and both ChatML tokens as unsplittable single ids."""
    return (tokenizer.chat_template is not None
            and _added_id(tokenizer, IM_START) is not None and _added_id(tokenizer, IM_END) is not None)


def add_chat_format(tokenizer):
    """Add the ChatML special tokens (never split, skipped by decode(skip_special_tokens=True)) and
    the chat template to `tokenizer`, in place; a tokenizer that has them is left as it is."""
    missing = [t for t in (IM_START, IM_END) if _added_id(tokenizer, t) is None]
    if missing:
        n = len(tokenizer)
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        setattr(tokenizer, _ADDED_IDS, list(range(n, len(tokenizer))))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def added_chat_ids(tokenizer) -> list[int]:
    """The ids add_chat_format added to this tokenizer object, whose rows fit_embeddings initialises
    (none for a tokenizer that came with them): the rows a LoRA run must train."""
    return list(getattr(tokenizer, _ADDED_IDS, []))


def _grown(weight: torch.Tensor, rows: int) -> nn.Parameter:
    """`weight` with zero rows appended up to `rows`; the existing rows are copied as they are."""
    grown = weight.new_zeros(rows, weight.size(1))
    grown[:weight.size(0)] = weight
    return nn.Parameter(grown, requires_grad=weight.requires_grad)


@torch.no_grad()
def fit_embeddings(model, tokenizer) -> None:
    """Make the model's token embedding and output head cover every id of `tokenizer`.

    The tables grow to pad_vocab(len(tokenizer)) rows when they are smaller, keeping every existing
    row; model.config.vocab_size follows. The rows of the ids add_chat_format added (and any rows
    the growth appended) start at the mean of the tokenizer's other rows: an average token, which
    neither dominates the first predictions nor starts far from what the network has seen.
    A tied head stays tied."""
    added = getattr(tokenizer, _ADDED_IDS, [])
    vocab = pad_vocab(len(tokenizer))
    old_rows = model.tok_emb.num_embeddings
    tied = model.lm_head.weight is model.tok_emb.weight
    tables = [model.tok_emb] if tied else [model.tok_emb, model.lm_head]
    if vocab > old_rows:
        model.tok_emb.weight = _grown(model.tok_emb.weight, vocab)
        model.tok_emb.num_embeddings = vocab
        model.lm_head.weight = model.tok_emb.weight if tied else _grown(model.lm_head.weight, vocab)
        model.lm_head.out_features = vocab
        model.config.vocab_size = vocab
    fresh = sorted(set(added) | set(range(old_rows, vocab)))
    if not fresh:
        return
    known = sorted(set(range(min(len(tokenizer), old_rows))) - set(added))
    for table in tables:
        w = table.weight
        w[fresh] = w[known].float().mean(dim=0).to(w.dtype)


def _check(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError("a conversation must be a non-empty list of {'role': ..., 'content': ...} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"message {i} of the conversation is {m!r}: each message must be "
                            f"{{'role': one of {', '.join(ROLES)}, 'content': text}}")


def _require_chat_format(tokenizer) -> None:
    if not has_chat_format(tokenizer):
        raise UserError("this tokenizer has no chat format: fine-tune the checkpoint with finetune.py "
                        "(it adds the chat template), or prompt it with plain text")


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """A whole conversation as (ids, assistant_mask): mask 1 on each assistant turn's content and its
    <|im_end|>, the tokens SFT trains on; 0 elsewhere."""
    _require_chat_format(tokenizer)
    _check(messages)
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return list(enc["input_ids"]), list(enc["assistant_masks"])


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation so far followed by the start of an assistant turn, for generating the reply."""
    _require_chat_format(tokenizer)
    _check(messages)
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              add_generation_prompt=True)["input_ids"])


def end_of_turn_id(tokenizer) -> int | None:
    """The id that ends a reply (<|im_end|>), or None for a tokenizer without the chat format."""
    return _added_id(tokenizer, IM_END) if has_chat_format(tokenizer) else None


def reply_stop_ids(tokenizer) -> tuple[int, ...]:
    """The ids a reply stops at: the end of its turn, and the start of a turn, which a reply that
    forgot to end its own (a briefly fine-tuned model's) would otherwise print before the next one."""
    return (_added_id(tokenizer, IM_END), _added_id(tokenizer, IM_START)) if has_chat_format(tokenizer) else ()
