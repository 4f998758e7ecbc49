"""Export a SmolHub checkpoint to a transformers folder, and import such a folder back.

    export: checkpoint -> folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load
            (native Llama / Mixtral / DeepseekV3 classes, or the bundled modelling code for the two
            architectures transformers has no class for), checked against our model before it appears
    import: that folder -> a SmolHub checkpoint folder (weights, config.json, tokenizer) for
            inference or `--init_from`

Each model's mapping to transformers lives beside the model, in `<Model>/state_dict_adapter.py`.
The exported config.json keeps our own config under "smolhub", so an import rebuilds exactly the
model that was exported (training-only fields such as dropout or router noise included).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_model as save_safetensors_from

from smolhub.checkpoint import load_checkpoint
from smolhub.errors import UserError
from smolhub.modeling import model_class

# fp32 logits of the two implementations differ by summation order only; a mapping error is O(1)
VERIFY_TOLERANCE = 1e-3


def adapter_for(architecture: str):
    """The model's own `<Model>/state_dict_adapter.py` (interface: smolhub_hub/state_dict_adapter.py)."""
    package = model_class(architecture).__module__.rpartition(".")[0]
    return importlib.import_module(f"{package}.state_dict_adapter")


def _problem(e: Exception) -> str:
    """The informative line of a load_state_dict error (its first line only says that loading failed)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)


def _fresh_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty: choose a new folder or delete it")


def _publish(tmp: Path, out_dir: Path) -> None:
    if out_dir.is_dir():  # an empty folder the user made beforehand
        out_dir.rmdir()
    tmp.rename(out_dir)


def _staging(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def special_token_ids(tokenizer) -> dict:
    """Our tokenizers have one special token, end-of-text, which also starts and pads (as GPT-2's)."""
    eos = tokenizer.eos_token_id
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}


def generation_config(tokenizer, vocab_size: int):
    """Greedy/sampled `generate()` as ours: stop at EOS (and at the end of a turn for a chat model),
    never emit the embedding's padding rows."""
    from transformers import GenerationConfig

    from smolhub.chat import end_of_turn_id

    ids = special_token_ids(tokenizer)
    turn = end_of_turn_id(tokenizer)
    if turn is not None:
        ids["eos_token_id"] = [ids["eos_token_id"], turn]
    padding = list(range(len(tokenizer), vocab_size))
    return GenerationConfig(**ids, suppress_tokens=padding or None)


def build_hf_model(adapter, hf_cfg, weights: dict):
    """The transformers model holding `weights`, built without a throwaway random init."""
    with torch.device("meta"):
        model = adapter.model_class()(hf_cfg)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"cannot place the weights in {type(model).__name__} ({_problem(e)}): this transformers "
                        "version lays it out differently; report it with `pip show transformers`") from None
    model.tie_weights()
    return model.eval()


def load_exported(folder: Path, dtype: torch.dtype = torch.float32):
    """Load an export with transformers, refusing one whose files do not fill every weight."""
    from transformers import AutoModelForCausalLM

    adapter = adapter_for(read_export_config(folder)["architecture"])
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, local_files_only=True, trust_remote_code=adapter.REMOTE_CODE,
            output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"transformers cannot load {folder} ({str(e).splitlines()[0]}); "
                        "re-export the checkpoint") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise UserError(f"{folder}: model.safetensors does not match config.json ({bad}); re-export the checkpoint")
    return model.eval()


def verify_export(folder: Path, model: torch.nn.Module) -> float:
    """Max |logit difference| between our model and transformers' load of the export, on a fixed input."""
    hf = load_exported(folder)
    idx = (torch.arange(min(32, model.config.block_size)) * 7 % model.config.vocab_size)[None]
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(idx).logits
    diff = (ours - theirs).abs().max().item()
    if not diff <= VERIFY_TOLERANCE:
        raise UserError(f"the export's logits differ from the checkpoint's by {diff:.3g}: this transformers "
                        f"version lays out {type(hf).__name__} differently; report it with `pip show transformers`")
    return diff


def export_checkpoint(checkpoint: str, out_dir: str | Path, verify: bool = True) -> Path:
    """Write `checkpoint` (a folder, run out_dir or Hub id) as a transformers folder at out_dir."""
    out_dir = Path(out_dir).expanduser()
    _fresh_target(out_dir)
    loaded = load_checkpoint(checkpoint)
    arch, model, tokenizer = loaded.config["architecture"], loaded.model, loaded.tokenizer
    adapter = adapter_for(arch)
    cfg = model.config
    hf_cfg = adapter.hf_config(cfg, special_token_ids(tokenizer))
    hf_cfg.smolhub = {"architecture": arch, "model": cfg.to_dict(), "meta": loaded.meta}
    hf_model = build_hf_model(adapter, hf_cfg, adapter.to_hf(model.state_dict(), cfg))
    hf_model.generation_config = generation_config(tokenizer, cfg.vocab_size)
    tmp = _staging(out_dir)
    try:
        hf_model.save_pretrained(str(tmp))
        tokenizer.model_max_length = cfg.block_size
        tokenizer.pad_token = tokenizer.eos_token  # batched generate() pads; GPT-2 style, as generation_config
        tokenizer.save_pretrained(str(tmp))
        if verify:
            verify_export(tmp, model)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_export_config(folder: Path) -> dict:
    """The SmolHub config stored in an export's config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file() or not (Path(folder) / "model.safetensors").is_file():
        raise UserError(f"{folder} is not an exported model (no config.json + model.safetensors); "
                        "pass a folder written by `python -m smolhub_hub export`")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is corrupt ({e}); re-export the checkpoint")
    smolhub = config.get("smolhub")
    if not isinstance(smolhub, dict) or "architecture" not in smolhub or "model" not in smolhub:
        raise UserError(f"{path} has no SmolHub config (key 'smolhub'): only folders written by "
                        "`python -m smolhub_hub export` can be imported")
    return smolhub


def import_transformers_folder(folder: str | Path, out_dir: str | Path) -> Path:
    """Turn an exported folder back into a SmolHub checkpoint folder at out_dir."""
    from safetensors.torch import load_file

    from smolhub.tokenizer import load_tokenizer

    folder, out_dir = Path(folder).expanduser(), Path(out_dir).expanduser()
    smolhub = read_export_config(folder)
    _fresh_target(out_dir)
    arch = smolhub["architecture"]
    cls, adapter = model_class(arch), adapter_for(arch)
    cfg = cls.config_class.for_inference(smolhub["model"])
    if adapter.REMOTE_CODE:
        # our own layout: read the tensors instead of running the folder's code
        weights = load_file(str(folder / "model.safetensors"))
    else:
        weights = load_exported(folder).state_dict()
    model = cls(cfg)
    try:
        model.load_state_dict(adapter.from_hf(weights, cfg), strict=True)
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{folder}: the weights do not match the {arch} config in its config.json "
                        f"({_problem(e)}); re-export the checkpoint") from None
    tokenizer = load_tokenizer(folder)
    tmp = _staging(out_dir)
    try:
        save_safetensors_from(model, str(tmp / "model.safetensors"))
        config = {"architecture": arch, "model": cfg.to_dict(), "meta": smolhub.get("meta", {})}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
