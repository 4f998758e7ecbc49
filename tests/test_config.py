"""Configs and the command line built from them."""
import json

import pytest

from smolhub.cli import parse_cli
from smolhub.config import TrainConfig
from smolhub.errors import UserError
from StoryLlama.config import PRESETS, StoryLlamaConfig


def parse(argv):
    return parse_cli((StoryLlamaConfig, TrainConfig), PRESETS, argv)


def test_defaults_flags_and_preset_precedence():
    m, t = parse([])
    assert (m.n_layer, m.n_embd, m.n_kv_heads, t.lr) == (8, 768, 4, 6e-4)
    m, t = parse(["--preset", "tiny"])
    assert (m.n_layer, m.n_embd, t.tokenizer) == (2, 128, "bpe")
    m, t = parse(["--preset", "tiny", "--n_layer", "3", "--lr", "1e-3", "--no_tie_embeddings"])
    assert (m.n_layer, t.lr, m.tie_embeddings) == (3, 1e-3, False)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_between_preset_and_flags(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    values = {"n_layer": 5, "lr": 0.002, "schedule": "cosine_restarts"}
    path.write_text(json.dumps(values) if suffix == ".json" else "n_layer: 5\nlr: 0.002\nschedule: cosine_restarts\n")
    m, t = parse(["--preset", "tiny", "--config", str(path), "--n_embd", "64"])
    assert (m.n_layer, m.n_embd, t.lr, t.schedule) == (5, 64, 0.002, "cosine_restarts")


@pytest.mark.parametrize("argv, message", [
    (["--n_layers", "4"], "n_layers"),
    (["--n_layer", "four"], "invalid int value"),
    (["--n_head", "12", "--n_kv_heads", "5"], "divisible by --n_kv_heads"),
    (["--n_embd", "100"], "divisible by --n_head"),
    (["--schedule", "linear"], "invalid choice"),
    (["--preset", "huge"], "unknown"),
    (["--lr", "-1"], "--lr"),
    (["--seq_len_stages", "a,b"], "comma-separated"),
])
def test_bad_flags_are_one_clear_error(argv, message):
    with pytest.raises(UserError, match=message):
        parse(argv)


def test_bad_config_files(tmp_path):
    bad_field = tmp_path / "a.json"
    bad_field.write_text(json.dumps({"n_layerz": 2}))
    with pytest.raises(UserError, match="unknown config fields"):
        parse(["--config", str(bad_field)])
    bad_type = tmp_path / "b.json"
    bad_type.write_text(json.dumps({"n_layer": "two"}))
    with pytest.raises(UserError, match="n_layer.*invalid int value"):
        parse(["--config", str(bad_type)])
    bad_type.write_text(json.dumps({"n_layer": 2.5}))
    with pytest.raises(UserError, match="n_layer must be an integer"):
        parse(["--config", str(bad_type)])
    broken = tmp_path / "c.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        parse(["--config", str(broken)])
    with pytest.raises(UserError, match="no such file"):
        parse(["--config", str(tmp_path / "missing.yaml")])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for field in list(StoryLlamaConfig.__dataclass_fields__) + list(TrainConfig.__dataclass_fields__):
        assert f"--{field}" in out, field
    assert "Key/value heads" in out and "Peak learning rate" in out
