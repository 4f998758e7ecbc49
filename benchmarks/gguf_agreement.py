"""How closely llama.cpp reproduces our logits from the GGUF export (CPU only; needs llama-cpp-python).

    python -m benchmarks.gguf_agreement                       # tiny models, briefly trained, both tokenizers
    python -m benchmarks.gguf_agreement --checkpoint out/StoryLlama --checkpoint out/StoryKimi

Prints a markdown table: for each architecture and tokenizer, the largest |logit difference| between
llama.cpp and our fp32 model over a Shakespeare passage, for each GGUF weight type, and how many of
q8_0's 32 greedy tokens are ours. The passage stays inside StoryMixtral's sliding window, where
llama.cpp computes our function (beyond it, it attends to every earlier token).
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smolhub_hub.gguf import GGUF_DTYPES, LLAMA_CPP_ARCH, export_gguf

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GREEDY_TOKENS = 32
# a 64-token window (the preset's is 32), so a prompt plus the greedy tokens fit where llama.cpp is exact
TINY_OVERRIDES = {"StoryMixtral": {"sliding_window": 64}}


def brief_training(model, ids: list[int], steps: int = 20) -> None:
    """A few AdamW steps: peaked next-token distributions, so a greedy continuation is decided by
    margins well above quantisation noise rather than by the near-ties of a random model. (The loss is
    taken from the logits: with GPT-2's 50k rows that is faster on CPU than the chunked training loss.)"""
    data, g = torch.tensor(ids), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (4,), generator=g)
        batch = torch.stack([data[s:s + 33] for s in starts])
        F.cross_entropy(model(batch[:, :-1])[0].flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def tiny_trained(arch: str, tokenizer, text: str, **overrides):
    """The tiny preset of `arch` for `tokenizer`, briefly trained on `text`. StoryKimi's selection bias
    is set at random afterwards, so that it changes which experts are picked (training leaves it near 0)."""
    from smolhub.config import pad_vocab
    from smolhub.modeling import model_class
    from smolhub.train import parse_train_flags

    torch.manual_seed(0)
    cls = model_class(arch)
    mcfg, _ = parse_train_flags(cls, ["--preset", "tiny"])
    model = cls(dataclasses.replace(mcfg, vocab_size=pad_vocab(len(tokenizer)), **overrides))
    brief_training(model, tokenizer.encode(text))
    if arch == "StoryKimi":
        with torch.no_grad():
            for block in model.blocks[model.config.first_k_dense:]:
                bias = block.ffn.router.balance_bias
                bias.copy_(0.05 * torch.randn(bias.shape))
    return model


def open_llama(path: Path):
    """llama.cpp with an fp32 KV cache (its default f16 would round every key and value)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def our_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].float().numpy()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def greedy_pair(model, llm, prompt: list[int], n: int, vocab: int) -> tuple[list[int], list[int]]:
    """n greedy tokens after `prompt` from us (full forward) and from llama.cpp (through its KV cache),
    over the tokenizer's ids only (generation never emits the embedding's padding rows)."""
    ours = []
    for _ in range(n):
        ours.append(int(np.argmax(our_logits(model, prompt + ours)[-1][:vocab])))
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(n):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1][:vocab])))
        llm.eval(theirs[-1:])
    return ours, theirs


def measure(checkpoint: Path, model, tokenizer, text: str, n_tokens: int, workdir: Path) -> dict:
    """Max |logit difference| per GGUF dtype on n_tokens of text, and q8_0's greedy agreement."""
    cfg = model.config
    n_tokens = min(n_tokens, cfg.block_size, getattr(cfg, "sliding_window", 0) or cfg.block_size)
    ids = tokenizer.encode(text)[:n_tokens]
    ours = our_logits(model, ids)
    row = {"max |logit|": float(np.abs(ours).max())}
    for dtype in GGUF_DTYPES:
        llm = open_llama(export_gguf(str(checkpoint), workdir / dtype, dtype).path)
        row[dtype] = float(np.abs(llama_logits(llm, ids) - ours).max())
        if dtype == "q8_0":
            ours, theirs = greedy_pair(model, llm, ids[:8], min(GREEDY_TOKENS, n_tokens - 8), len(tokenizer))
            same = next((i for i, (x, y) in enumerate(zip(ours, theirs, strict=True)) if x != y), len(ours))
            row["q8_0 greedy"] = f"{same}/{len(ours)}"  # tokens before the first difference
        llm.close()
    return row


def table(rows: list[tuple[str, str, dict]]) -> str:
    head = ["model", "llama.cpp arch", "tokenizer", "max \\|logit\\|", *GGUF_DTYPES, "q8_0 greedy tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, tok, r in rows:
        cells = [name, LLAMA_CPP_ARCH[name], tok, f"{r['max |logit|']:.2f}", *(f"{r[d]:.1e}" for d in GGUF_DTYPES),
                 r["q8_0 greedy"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[],
                   help="Measure this checkpoint (repeatable) instead of the tiny models.")
    p.add_argument("--archs", nargs="+", default=list(LLAMA_CPP_ARCH), help="Tiny models: the architectures.")
    p.add_argument("--tokenizers", nargs="+", default=["gpt2", "bpe"], choices=["gpt2", "bpe"],
                   help="Tiny models: GPT-2's tokenizer and/or a 300-token BPE trained on the text (with the "
                   "chat tokens).")
    p.add_argument("--gpt2", default=str(SHARED_DATA / "gpt2"), help="Folder with GPT-2's tokenizer files.")
    p.add_argument("--text", default=str(SHARED_DATA / "tinyshakespeare" / "input.txt"),
                   help="Text the tiny models train on and every model is measured on.")
    p.add_argument("--tokens", type=int, default=64, help="Tokens of text compared (capped by the context "
                   "and StoryMixtral's window).")
    args = p.parse_args(argv)

    from smolhub.checkpoint import load_checkpoint, save_checkpoint

    text = Path(args.text).read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.checkpoint:
            for i, path in enumerate(args.checkpoint):
                loaded = load_checkpoint(path)
                model = loaded.model.float().eval()
                rows.append((loaded.config["architecture"], "checkpoint's",
                             measure(Path(path), model, loaded.tokenizer, text[-20_000:], args.tokens, tmp / str(i))))
        else:
            from smolhub.chat import add_chat_format
            from smolhub.tokenizer import gpt2_tokenizer, train_bpe

            train = text[:100_000]
            chunks = [train[i:i + 2000] for i in range(0, len(train), 2000)]
            tokenizers = {"gpt2": lambda: gpt2_tokenizer(args.gpt2),
                          "bpe": lambda: add_chat_format(train_bpe(chunks, 300))}
            for tok in args.tokenizers:
                tokenizer = tokenizers[tok]()
                for arch in args.archs:
                    model = tiny_trained(arch, tokenizer, text[:20_000], **TINY_OVERRIDES.get(arch, {}))
                    ckpt = save_checkpoint(tmp / f"{arch}-{tok}", 20, model, tokenizer, {"step": 20})
                    rows.append((arch, tok, measure(ckpt, model, tokenizer, text[-20_000:], args.tokens,
                                                    tmp / f"{arch}-{tok}-gguf")))
    print(table(rows))


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds synchronisation
    main()
