"""Export to transformers and back: every exportable architecture loads with AutoModelForCausalLM /
AutoTokenizer from the folder alone, gives our logits and our greedy text, and imports back exactly."""
import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHAKESPEARE, tiny_model
from smolhub.checkpoint import save_checkpoint
from smolhub.errors import UserError
from smolhub.generate import SamplingConfig, generate_ids
from smolhub.modeling import ARCHITECTURES, model_class
from smolhub.tokenizer import train_bpe
from smolhub_hub.export import adapter_for, export_checkpoint, import_transformers_folder

PROMPTS = ["First Citizen:", "The king", "O Romeo, Romeo"]
ARCHS = sorted(ARCHITECTURES)


def tiny_tokenizer():
    """A 300-token BPE, so the models' 320-row embeddings carry padding rows that must never be emitted."""
    text = SHAKESPEARE.read_text()[:100_000]
    return train_bpe([text[i:i + 2000] for i in range(0, len(text), 2000)], 300)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


def scramble(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the init, so greedy decoding wanders instead of repeating one token, and
    saved buffers such as routing biases non-zero, so a wrong mapping of them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            base = 1.0 if t.dim() == 1 and name.endswith("weight") else 0.0  # norm gains around 1
            t.copy_(base + 0.1 * torch.randn(t.shape, generator=g))


def tiny_checkpoint(arch: str, tokenizer, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A saved tiny-preset checkpoint of `arch` (config fields as overridden) with scrambled fp32 weights."""
    torch.manual_seed(seed)
    model = tiny_model(arch, **overrides)
    scramble(model, seed)
    meta = {"step": 7, "tokens_seen": 7 * 2048, "val_loss": 5.25, "dataset": "tinyshakespeare"}
    return save_checkpoint(out_dir, 7, model, tokenizer, meta, trainer_state={"step": 7})


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_has_a_state_dict_adapter_beside_it(arch):
    """Found from the model alone: no second list of models to keep in step with ARCHITECTURES."""
    adapter = adapter_for(arch)
    assert adapter.__name__ == f"{arch}.state_dict_adapter"
    assert Path(adapter.__file__).parent == Path(inspect.getfile(model_class(arch))).parent
    assert isinstance(adapter.REMOTE_CODE, bool)
    for name in ("model_class", "hf_config", "to_hf", "from_hf"):
        assert callable(getattr(adapter, name)), name


def load_with_transformers(folder: Path, arch: str):
    """The export as a user loads it: the folder alone, offline (plus its own code for two architectures)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    remote = adapter_for(arch).REMOTE_CODE
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote,
                                                 local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(folder, trust_remote_code=remote, local_files_only=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_transformers_with_same_logits_and_text(arch, tokenizer, tmp_path):
    from smolhub.checkpoint import load_checkpoint

    ckpt = tiny_checkpoint(arch, tokenizer, tmp_path / "run")
    exported = export_checkpoint(str(ckpt), tmp_path / "hf", verify=False)  # checked here, more thoroughly
    hf, hf_tok = load_with_transformers(exported, arch)
    ours = load_checkpoint(str(ckpt))
    model, tok = ours.model, ours.tokenizer

    assert hf.num_parameters() == model.num_params()
    idx = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)

    # with a sliding window, decode past it, so the windowed KV caches are compared too
    n_new = max(16, getattr(model.config, "sliding_window", 0) + 4)
    greedy = SamplingConfig(max_new_tokens=n_new, temperature=0)
    texts = set()
    for prompt in PROMPTS:
        enc = hf_tok(prompt, return_tensors="pt")
        assert enc.input_ids[0].tolist() == tok.encode(prompt, add_special_tokens=False)
        ids = torch.cat(list(generate_ids(model, enc.input_ids, greedy, tok.eos_token_id, len(tok)))).tolist()
        out = hf.generate(**enc, max_new_tokens=n_new, do_sample=False)[0, enc.input_ids.size(1):].tolist()
        assert out == ids
        text = hf_tok.decode(out, skip_special_tokens=True)
        assert text == tok.decode([i for i in ids if i != tok.eos_token_id])
        texts.add(text)
    assert len(texts) == len(PROMPTS), texts  # the scrambled model says different things

    back = import_transformers_folder(exported, tmp_path / "back")
    a, b = load_file(ckpt / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    original, imported = json.loads((ckpt / "config.json").read_text()), json.loads((back / "config.json").read_text())
    assert imported == original
    assert load_checkpoint(str(back)).tokenizer.encode(PROMPTS[2]) == tok.encode(PROMPTS[2])


@pytest.mark.parametrize("arch", [a for a in ARCHS if adapter_for(a).REMOTE_CODE])
def test_bundled_code_generates_left_padded_batches_like_single_prompts(arch, tokenizer, tmp_path):
    """modeling_smolhub.py's own attention mask and position ids, as batched generate() uses them."""
    ckpt = tiny_checkpoint(arch, tokenizer, tmp_path / "run")
    hf, hf_tok = load_with_transformers(export_checkpoint(str(ckpt), tmp_path / "hf", verify=False), arch)
    hf_tok.padding_side = "left"
    enc = hf_tok(PROMPTS[1:], return_tensors="pt", padding=True)
    assert not bool(enc.attention_mask.all())
    batch = hf.generate(**enc, max_new_tokens=10, do_sample=False)[:, enc.input_ids.size(1):]
    for row, prompt in zip(batch, PROMPTS[1:]):
        single = hf_tok(prompt, return_tensors="pt")
        assert row.tolist() == hf.generate(**single, max_new_tokens=10, do_sample=False)[0, -10:].tolist()


def test_sinusoidal_positions_export_exactly(tokenizer, tmp_path):
    """SmolTransformer's parameter-free positions: the bundled code recomputes the checkpoint's table."""
    from smolhub.checkpoint import load_checkpoint

    ckpt = tiny_checkpoint("SmolTransformer", tokenizer, tmp_path / "run", positions="sinusoidal")
    exported = export_checkpoint(str(ckpt), tmp_path / "hf", verify=False)
    hf, hf_tok = load_with_transformers(exported, "SmolTransformer")
    model = load_checkpoint(str(ckpt)).model
    idx = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)
    enc = hf_tok(PROMPTS[0], return_tensors="pt")
    ids = torch.cat(list(generate_ids(model, enc.input_ids, SamplingConfig(max_new_tokens=16, temperature=0),
                                      hf_tok.eos_token_id, len(hf_tok)))).tolist()
    assert hf.generate(**enc, max_new_tokens=16, do_sample=False)[0, enc.input_ids.size(1):].tolist() == ids
    back = import_transformers_folder(exported, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["model"]["positions"] == "sinusoidal"


def test_cli_export(tokenizer, tmp_path, capsys):
    """The export command on a run's out_dir (its newest checkpoint); `python -m` itself runs in test_hub.py."""
    from smolhub_hub.cli import main

    tiny_checkpoint("StoryLlama", tokenizer, tmp_path / "run")
    main(["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert "logits checked" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.mark.parametrize("command", ["push", "pull", "export", "import"])
def test_every_command_has_help(command, capsys):
    from smolhub_hub.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: python -m smolhub_hub " + command in capsys.readouterr().out


def test_clear_errors(tokenizer, tmp_path):
    with pytest.raises(UserError, match="not a SmolHub checkpoint"):
        export_checkpoint(str(tmp_path), tmp_path / "hf")
    ckpt = tiny_checkpoint("StoryLlama", tokenizer, tmp_path / "run")
    with pytest.raises(UserError, match="not an exported model|no SmolHub config"):
        import_transformers_folder(ckpt, tmp_path / "back")  # a SmolHub checkpoint, not an export
    exported = export_checkpoint(str(ckpt), tmp_path / "hf")
    with pytest.raises(UserError, match="already exists and is not empty"):
        export_checkpoint(str(ckpt), exported)

    config = json.loads((exported / "config.json").read_text())
    config["smolhub"]["model"]["ffn_hidden"] = 192
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="do not match"):
        import_transformers_folder(exported, tmp_path / "back")
    config["smolhub"]["model"]["ffn_hidden"] = 256
    config["intermediate_size"] = 192
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match|cannot load"):
        import_transformers_folder(exported, tmp_path / "back")
    assert not (tmp_path / "back").exists()

    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["n_layer"] = 3
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="do not match config.json"):
        export_checkpoint(str(ckpt), tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()
