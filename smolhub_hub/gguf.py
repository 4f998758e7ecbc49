"""Export a SmolHub checkpoint as one GGUF file for llama.cpp (and what runs on it: ollama, LM Studio).

    python -m smolhub_hub export out/StoryLlama exported/ --format gguf --dtype q8_0

Three architectures have an exact llama.cpp counterpart:
    StoryLlama   -> llama      (RMSNorm, GQA, rotary positions, SwiGLU)
    StoryMixtral -> llama      with experts: softmax over all experts, top-k, renormalised
    StoryKimi    -> deepseek2  latent attention, shared expert, sigmoid router whose selection bias
                               is `exp_probs_b`, renormalised top-k, leading dense blocks
Two have none, and are refused (see UNSUPPORTED).

The weights go through the model's own transformers mapping (<Model>/state_dict_adapter.py) and then
through the steps llama.cpp's convert_hf_to_gguf.py applies to those transformers classes: the rotary
rows of q and k from the rotate-half layout (dimension i pairs with i + d/2) to the adjacent pairs
(2i, 2i+1) that llama.cpp's "normal" RoPE rotates; fused experts split into gate and up stacks; and for
MLA, kv_b split into k_b (transposed, absorbed into the query) and v_b. gguf's TensorNameMap names them.

StoryMixtral's sliding window has no counterpart in llama.cpp's llama architecture, which attends to
every earlier token: the export computes our function for the first `sliding_window` tokens of a
context only, and says so (exactness()).

The tokenizer is written as llama.cpp's "gpt2" BPE with pre-tokenizer "gpt-2": GPT-2's tokenizer and
the byte-level BPE we train (smolhub/tokenizer.py) both split text with GPT-2's regex and no
normaliser, so llama.cpp gives our ids for either; a tokenizer that splits differently is refused.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from smolhub.errors import UserError

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_DTYPE = "f16"

LLAMA_CPP_ARCH = {"StoryLlama": "llama", "StoryMixtral": "llama", "StoryKimi": "deepseek2"}

# Why no llama.cpp architecture computes these, from its src/models/*.cpp
UNSUPPORTED = {
    "SmolTransformer": "absolute positions (learned or sinusoidal) with RMSNorm, and every llama.cpp architecture "
                       "with a position table (gpt2, starcoder, mpt, bert) normalises with LayerNorm instead",
    "SmolMixtral": "LayerNorm with a bias before Mixtral experts, and llama.cpp's MoE architectures normalise with "
                   "RMSNorm (phimoe adds a bias to it) or, in dbrx, with a LayerNorm that has no bias and no "
                   "router or expert biases to fold one into",
}


@dataclass
class GGUFExport:
    path: Path
    arch: str  # the llama.cpp architecture
    dtype: str
    exact: str  # what llama.cpp computes, in words


def _refuse_unsupported(arch: str) -> None:
    if arch in UNSUPPORTED:
        raise UserError(f"llama.cpp has no architecture that computes {arch}: {UNSUPPORTED[arch]}; "
                        "export it for transformers instead (`python -m smolhub_hub export CHECKPOINT OUT_DIR`)")
    if arch not in LLAMA_CPP_ARCH:
        raise UserError(f"no GGUF mapping for {arch}; export it for transformers instead")


# --- weights ---------------------------------------------------------------------------------
def _rope_to_adjacent_pairs(w: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Rows of n_groups rotary blocks, each from rotate-half order [x_0..x_{d/2-1}, y_0..y_{d/2-1}] to the
    adjacent order [x_0, y_0, x_1, y_1, ...] that llama.cpp's RoPE rotates."""
    return w.reshape(n_groups, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _split_experts(hf: dict) -> dict:
    """transformers' fused gate_up_proj (E, 2*hidden, dim), gate first, as the two stacks llama.cpp reads."""
    out = {}
    for name, t in hf.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            stem = name[:-len("gate_up_proj")]
            out[stem + "gate_proj.weight"], out[stem + "up_proj.weight"] = t.chunk(2, dim=1)
        elif name.endswith("mlp.experts.down_proj"):
            out[name + ".weight"] = t
        else:
            out[name] = t
    return out


def _llama_tensors(hf: dict, cfg) -> dict:
    for name in list(hf):
        if name.endswith("self_attn.q_proj.weight"):
            hf[name] = _rope_to_adjacent_pairs(hf[name], cfg.n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            hf[name] = _rope_to_adjacent_pairs(hf[name], cfg.n_kv_heads)
    return hf


def _deepseek2_tensors(hf: dict, cfg) -> dict:
    nope, rope, v, rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    out = {}
    for name, t in hf.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            heads = t.reshape(cfg.n_head, nope + rope, -1)
            rot = _rope_to_adjacent_pairs(heads[:, nope:].reshape(cfg.n_head * rope, -1), cfg.n_head)
            out[name] = torch.cat([heads[:, :nope], rot.reshape(cfg.n_head, rope, -1)], dim=1).reshape(t.shape)
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):  # [latent | the one shared rotary key]
            out[name] = torch.cat([t[:rank], _rope_to_adjacent_pairs(t[rank:], 1)])
        elif name.endswith("self_attn.kv_b_proj.weight"):
            k_b, v_b = t.reshape(cfg.n_head, nope + v, rank).split([nope, v], dim=1)
            out[name.replace("kv_b_proj", "k_b_proj")] = k_b.transpose(1, 2)  # (head, rank, nope)
            out[name.replace("kv_b_proj", "v_b_proj")] = v_b  # (head, v, rank)
        elif name.endswith("gate.e_score_correction_bias"):
            out[name.replace("e_score_correction_bias", "e_score_correction.bias")] = t
        elif ".shared_experts." in name and not cfg.n_shared_experts:
            # llama.cpp always runs a shared expert: one of zeros adds exactly nothing
            width = cfg.expert_hidden
            out[name] = t.new_zeros((cfg.n_embd, width) if "down_proj" in name else (width, cfg.n_embd))
        else:
            out[name] = t
    return out


def gguf_tensors(arch: str, model) -> dict:
    """GGUF tensor name -> fp32 tensor, laid out as llama.cpp's `arch` graph reads it."""
    import gguf

    from smolhub_hub.export import adapter_for

    cfg = model.config
    if getattr(cfg, "capacity_factor", 0) > 0:
        raise UserError(f"this checkpoint drops tokens over expert capacity (capacity_factor {cfg.capacity_factor}), "
                        "which llama.cpp cannot reproduce; set \"capacity_factor\": 0 in its config.json to export it "
                        "(inference then routes every token)")
    hf = {k: v.detach().float() for k, v in adapter_for(arch).to_hf(model.state_dict(), cfg).items()}
    if cfg.tie_embeddings:
        del hf["lm_head.weight"]  # llama.cpp reuses token_embd when output.weight is absent
    hf = _split_experts(hf)
    hf = _deepseek2_tensors(hf, cfg) if LLAMA_CPP_ARCH[arch] == "deepseek2" else _llama_tensors(hf, cfg)
    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == LLAMA_CPP_ARCH[arch])
    names = gguf.get_tensor_name_map(gguf_arch, cfg.n_layer)
    out = {}
    for name, t in hf.items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"this gguf package has no GGUF name for {name}: install the gguf version that "
                            "pyproject.toml names")
        out[new] = t.contiguous()
    return out


def _qtype(name: str, t: torch.Tensor, dtype: str):
    """The GGML type of one tensor: norms, biases, 1-D tensors and the router stay fp32 as llama.cpp's
    converter keeps them (its kernels expect fp32 there, and routing decisions are sensitive)."""
    import gguf

    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    if t.dim() <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return types[dtype]


# --- metadata ------------------------------------------------------------------------------------
def _hparams(w, arch: str, cfg) -> None:
    import gguf

    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    if LLAMA_CPP_ARCH[arch] == "llama":
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        if hasattr(cfg, "n_experts"):
            w.add_feed_forward_length(cfg.expert_hidden)
            w.add_expert_count(cfg.n_experts)
            w.add_expert_used_count(cfg.top_k)
        else:
            w.add_feed_forward_length(cfg.ffn_hidden)
        return
    # deepseek2: MLA runs as multi-query attention over the latent (llama.cpp's absorbed form)
    w.add_head_count_kv(1)
    w.add_q_lora_rank(cfg.q_lora_rank)  # 0 = queries projected directly (llama.cpp requires the key)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_leading_dense_block_count(cfg.first_k_dense)
    w.add_expert_feed_forward_length(cfg.expert_hidden)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.top_k)
    w.add_expert_shared_count(max(cfg.n_shared_experts, 1))  # see _deepseek2_tensors: a zero expert for 0
    w.add_expert_weights_norm(True)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def _check_pretokenizer(tokenizer) -> dict:
    """The tokenizer's JSON, refused unless llama.cpp's "gpt-2" pre-tokenizer reproduces its ids."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec["model"]
    gpt2_like = (spec.get("normalizer") is None and model.get("type") == "BPE"
                 and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
                 and not model.get("byte_fallback") and not model.get("ignore_merges")
                 and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix"))
    if not gpt2_like:
        raise UserError("this checkpoint's tokenizer is not a GPT-2 style byte-level BPE (GPT-2's regex, no "
                        "normaliser), which is the only kind llama.cpp is given here; export for transformers")
    return model


# transformers' {% generation %} marks the tokens an assistant-only loss trains on; it changes no
# rendered text, and llama.cpp's template engines do not know the tag
_GENERATION_TAG = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def _tokenizer(w, tokenizer, vocab_size: int) -> None:
    import gguf

    from smolhub.chat import end_of_turn_id, has_chat_format

    model = _check_pretokenizer(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.added_tokens_decoder)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding's padding rows: never produced by the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = tokenizer.eos_token_id  # end-of-text also starts and pads, as in our training data
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_add_bos_token(False)  # our prompts are encoded without it
    w.add_add_eos_token(False)
    if has_chat_format(tokenizer):
        w.add_eot_token_id(end_of_turn_id(tokenizer))
        w.add_chat_template(_GENERATION_TAG.sub("", tokenizer.chat_template))


def exactness(arch: str, cfg) -> str:
    """What llama.cpp's graph computes compared with ours, in one sentence."""
    window = getattr(cfg, "sliding_window", 0)
    if window and window < cfg.block_size:
        # llama.cpp's llama architecture reads no sliding-window key: every layer attends causally to all
        return (f"llama.cpp's llama architecture has no sliding window: logits are ours for the first {window} "
                f"tokens of a context; from token {window + 1} on it attends to every earlier token where ours "
                f"sees the last {window}")
    return f"the same function as the checkpoint over its whole {cfg.block_size}-token context"


def write_gguf(path: Path, arch: str, model, tokenizer, dtype: str, name: str) -> None:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), LLAMA_CPP_ARCH[arch])
    try:
        w.add_name(name)
        file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                      "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
        w.add_file_type(file_types[dtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(w, arch, cfg)
        _tokenizer(w, tokenizer, cfg.vocab_size)
        for tname, t in gguf_tensors(arch, model).items():
            qtype = _qtype(tname, t, dtype)
            try:
                data = gguf.quants.quantize(t.numpy(), qtype)
            except gguf.QuantError:  # q8_0 needs rows of a multiple of 32 numbers: f16, as llama.cpp's converter
                qtype = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(t.numpy(), qtype)
            w.add_tensor(tname, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def export_gguf(checkpoint: str, out_dir: str | Path, dtype: str = DEFAULT_DTYPE) -> GGUFExport:
    """Write `checkpoint` (a folder, run out_dir or Hub id) as out_dir/<architecture>-<dtype>.gguf."""
    from smolhub.checkpoint import load_checkpoint
    from smolhub_hub.export import _fresh_target, _publish, _staging

    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not a GGUF type this export writes: use one of {', '.join(GGUF_DTYPES)}")
    out_dir = Path(out_dir).expanduser()
    _fresh_target(out_dir)
    loaded = load_checkpoint(checkpoint)
    arch, model = loaded.config["architecture"], loaded.model
    _refuse_unsupported(arch)
    filename = f"{arch}-{dtype}.gguf"
    tmp = _staging(out_dir)
    try:
        write_gguf(tmp / filename, arch, model.float().eval(), loaded.tokenizer, dtype, arch)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GGUFExport(out_dir / filename, LLAMA_CPP_ARCH[arch], dtype, exactness(arch, model.config))
