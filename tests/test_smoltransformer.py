"""SmolTransformer: its default shape, the FLOPs count, block structure against a hand-written GPT,
learned and sinusoidal position limits, and a real tiny run with the GPT-2 tokenizer on prepared data.
The contract all five models share is in test_model_contract.py."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import GPT2_DIR, SHAKESPEARE, tiny_model
from smolhub.errors import UserError
from smolhub.generate import SamplingConfig, generate_ids
from SmolTransformer.config import SmolTransformerConfig
from SmolTransformer.model import SmolTransformer


def test_default_config_follows_models_md():
    cfg = SmolTransformerConfig(vocab_size=50304)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.block_size, cfg.ffn_hidden) == (768, 16, 12, 1024, 3072)
    assert cfg.positions == "learned"


def test_flops_per_token_is_nanogpts_estimate_at_the_gpt2_shape():
    """nanoGPT's estimate_mfu: 6 x parameters without the position table (a lookup) + 12 L C T.
    Counted here by hand: per block q/k/v and output projections (4 C^2), the MLP (8 C^2) and two
    norm weights; then the tied head (V C) and the final norm."""
    V, C, L, T = 50304, 768, 12, 1024
    with torch.device("meta"):
        model = SmolTransformer(SmolTransformerConfig(vocab_size=V, n_layer=L))
    multiplied = L * (4 * C * C + 8 * C * C + 2 * C) + V * C + C
    assert model.flops_per_token(T) == 6 * multiplied + 12 * L * C * T
    assert model.num_params() - multiplied == T * C  # only the position table is left out


def test_classic_gpt_layout():
    model = tiny_model("SmolTransformer")
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.pos_emb.weight.shape == (128, 128)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    attn = model.blocks[0].attn
    assert attn.n_kv_heads == attn.n_head == 4  # multi-head: every head has its own keys and values
    assert model.blocks[0].mlp.up.out_features == 4 * 128


def reference_forward(model: SmolTransformer, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward written out plainly (explicit softmax attention), with RMSNorm, no biases."""
    cfg = model.config
    B, T = idx.shape

    def rms(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    x = model.tok_emb.weight[idx] + model.pos_emb.weight[:T]
    for block in model.blocks:
        h = rms(x, block.attn_norm.weight)
        q, k, v = (h @ block.attn.qkv.weight.T).split(cfg.n_embd, dim=-1)
        q, k, v = (t.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, cfg.n_embd)
        x = x + y @ block.attn.out.weight.T
        h = rms(x, block.mlp_norm.weight)
        x = x + F.gelu(h @ block.mlp.up.weight.T, approximate="tanh") @ block.mlp.down.weight.T
    return rms(x, model.norm.weight) @ model.tok_emb.weight.T


def test_forward_matches_a_plain_gpt():
    torch.manual_seed(0)
    model = tiny_model("SmolTransformer").eval()
    for p in model.parameters():  # norms start at 1: give them values a wrong formula would show
        if p.dim() == 1:
            nn.init.uniform_(p, 0.5, 1.5)
    idx = torch.randint(0, 320, (2, 37))
    with torch.no_grad():
        logits, _ = model(idx)
        reference = reference_forward(model, idx)
    assert reference.abs().max() > 0.1
    # fp32 (the norms compute in fp32 whatever the input): SDPA and the explicit softmax agree to rounding
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


def test_longer_than_the_context_is_refused_not_wrapped():
    model = tiny_model("SmolTransformer", block_size=32).eval()
    model(torch.zeros(1, 32, dtype=torch.long))  # exactly the context is fine
    with pytest.raises(ValueError, match="beyond the 32 learned positions"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.make_kv_cache(1, 40, "cpu", torch.float32)
    model(torch.zeros(1, 30, dtype=torch.long), kv_cache=cache, start_pos=0)
    with pytest.raises(ValueError, match="beyond the 32 learned positions"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache, start_pos=30)


def test_sinusoidal_positions_train_refuse_beyond_the_context_and_hold_no_weights():
    """config.positions = "sinusoidal": the fixed table replaces the learned one (block_size x n_embd
    fewer parameters, none of them in a checkpoint, no FLOPs either way), has the same limit, and a
    tiny model learns with it. Its cached decoding is in test_model_contract.py."""
    learned, model = tiny_model("SmolTransformer"), tiny_model("SmolTransformer", positions="sinusoidal", block_size=32)
    assert learned.num_params() - tiny_model("SmolTransformer", positions="sinusoidal").num_params() == 128 * 128
    assert model.lookup_params() == 0 and not any(k.startswith("pos_emb") for k in model.state_dict())
    assert model.flops_per_token(32) == tiny_model("SmolTransformer", block_size=32).flops_per_token(32)
    with pytest.raises(ValueError, match="beyond the 32 positions"):
        model(torch.zeros(1, 33, dtype=torch.long))
    torch.manual_seed(0)
    batch = torch.randint(0, 320, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 5.5 and losses[-1] < losses[0] - 2.0, losses


def test_generation_crops_the_prompt_to_the_context():
    torch.manual_seed(2)
    model = tiny_model("SmolTransformer", block_size=32).eval()
    prompt = torch.randint(0, 320, (2, 50))
    out = torch.stack(list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=12, temperature=0))), 1)
    assert out.shape == (2, 12)
    # the kept prompt is the last 32 tokens: the same continuation as from those alone ...
    same = torch.stack(list(generate_ids(model, prompt[:, -32:], SamplingConfig(max_new_tokens=12, temperature=0))), 1)
    assert torch.equal(out, same)
    # ... and as greedy decoding without a cache, each step seeing the last 32 tokens
    idx = prompt
    for _ in range(12):
        idx = torch.cat([idx, model(idx[:, -32:])[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx[:, 50:])
    # a generation longer than the context slides along it, never past the 32 positions
    assert len(list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=40)))) == 40


def test_prepared_data_then_tiny_run_with_real_gpt2_tokenizer(tmp_path, capsys):
    """`python -m smolhub.data prepare` fills the cache; the trainer then finds it (no second
    tokenisation), trains the tiny preset with GPT-2's vocabulary and lowers the validation loss.
    Both run in this process: importing torch again in a subprocess costs more than the run."""
    from smolhub.data.__main__ import main as prepare_main
    from smolhub.inference import generate_text, load_model
    from SmolTransformer.trainer import main as train_main

    data = tmp_path / "data"
    flags = ["--dataset", str(SHAKESPEARE), "--tokenizer", str(GPT2_DIR), "--data_dir", str(data)]
    prepare_main(["prepare", *flags, "--max_tokens", "200K"])
    assert "train on it with: trainer.py" in capsys.readouterr().out
    prepared = [p for p in data.iterdir() if not p.name.startswith(".")]
    assert len(prepared) == 1 and json.loads((prepared[0] / "meta.json").read_text())["n_train_tokens"] == 200_000
    stamp = (prepared[0] / "train_000.bin").stat().st_mtime_ns

    out = tmp_path / "out"
    result = train_main(["--preset", "tiny", *flags, "--max_tokens", "200000", "--out_dir", str(out),
                         "--n_embd", "64", "--n_head", "2", "--ffn_hidden", "256", "--block_size", "32",
                         "--batch_size", "2", "--max_steps", "100", "--eval_interval", "50", "--eval_batches", "2",
                         "--warmup_steps", "10", "--sample_interval", "0"])
    assert [p for p in data.iterdir() if not p.name.startswith(".")] == prepared
    assert (prepared[0] / "train_000.bin").stat().st_mtime_ns == stamp
    val = [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    # GPT-2's 50257 tokens start near ln(50257) = 10.8; a hundred steps learn at least their frequencies
    assert len(val) == 3 and val[0] > 10 and val[-1] < 8.0, val
    assert result["val_loss"] == val[-1]

    model = load_model(str(out), device="cpu")
    assert type(model.model).__name__ == "SmolTransformer" and model.model.config.vocab_size == 50304
    assert model.tokenizer.encode("Hello world") == [15496, 995]
    text = generate_text(model=model, prompt="ROMEO:", max_length=20, temperature=0.8, seed=0)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_trainer_flags_and_default_dataset(tmp_path, capsys):
    from SmolTransformer.trainer import main as train_main

    with pytest.raises(SystemExit):
        train_main(["--help"])
    help_text = capsys.readouterr().out
    assert "--grad_checkpointing" in help_text and "--positions {learned,sinusoidal}" in help_text
    # the default dataset is FineWeb-Edu streamed from the Hub: unreachable here, so the fix is named
    with pytest.raises(UserError, match=r"HuggingFaceFW/fineweb-edu.*--dataset path/to/file"):
        train_main(["--preset", "tiny", "--tokenizer", str(GPT2_DIR), "--data_dir", str(tmp_path / "d"),
                    "--out_dir", str(tmp_path / "o"), "--num_proc", "2"])
    assert not list((tmp_path / "d").iterdir())  # nothing half-prepared left behind
