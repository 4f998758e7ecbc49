"""Quantized inference through torchao: int8 or int4 weights, or int8 weights with int8 activations.

`quantize_model(model, mode)` quantizes a model in place, on its device and in its dtype:

    int8          torchao Int8WeightOnlyConfig: int8 weights, one scale per output channel
    int8-dynamic  torchao Int8DynamicActivationInt8WeightConfig: also each activation row to int8 at
                  run time, and an int8 x int8 matmul (torch._int_mm)
    int4          int4 weights in groups of 128 inputs (64 or 32 where the width asks) with a scale and
                  zero point per group, run by the tinygemm kernels that ship in torch itself:
                  CUDA: Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d") (bfloat16,
                  compute capability 8.0+; torchao pads each matrix's inputs to a multiple of 1024);
                  CPU: torchao's PrototypeInt4WeightOnlyConfig (Int4OpaqueTensor), for output widths
                  in 16s. A layer int4 cannot hold keeps the model's dtype. torchao's default int4
                  format needs the mslk package, which is not on PyPI.

None of these runs torchao's own C++ extensions, so a torchao wheel built for another torch still works.

What is quantized: every nn.Linear, the experts included, except the routers (they route in fp32 on
their weights as a matrix) and StoryKimi's W_uk/W_uv (`wkv_b`, read as a matrix by the absorbed
decode). torchao's int8 and int4 tensors have no batched or grouped matmul (only its float8 tensor has
one), so a GroupedExperts' two 3-D parameters become one nn.Linear per expert and matrix
(`QuantizedExperts`), which torchao quantizes like any other. The output head is int8 in every mode: a
4-bit head costs the most quality (llama.cpp's Q4 files keep theirs at 6 bits or more), and the token
table, tied to it in all five models, is looked up in that same int8 matrix (`QuantizedEmbedding`),
so the pair is stored once. Norms and learned positions keep the model's dtype.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from smolhub.errors import UserError
from smolhub.layers import GroupedExperts

QUANTIZE_CHOICES = ("none", "int8", "int8-dynamic", "int4")
# the --quantize flag's help wherever a model is loaded (inference, the app, the server)
QUANTIZE_HELP = ("Weights in fewer bits through torchao: int8, int8-dynamic (int8 activations too; CPU only) or "
                 "int4; the output head is int8. Smaller, not faster: on a GPU every setting decodes slower than "
                 "bf16 (the README's Deploy table).")
INT4_GROUP_SIZES = (128, 64, 32)  # torchao's int4 kernels take these; the largest that divides a width
# read as matrices outside their module's forward: routers (fp32 routing), MLA's absorbed W_uk/W_uv
NOT_QUANTIZED = ("router.gate", "router.noise", "wkv_b")


def _torchao():
    """torchao.quantization, imported without the log lines of the C++ extensions that do not load
    here (float8/mxfp8 kernels, which nothing of ours uses) and torch's deprecation note about them."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.quantization
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig  # noqa: F401
    except ImportError as e:
        raise UserError(f"--quantize needs torchao ({e}): pip install torchao") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return torchao.quantization


def _config(mode: str, device: torch.device, group_size: int = INT4_GROUP_SIZES[0]):
    """torchao's config for `mode` on this kind of device."""
    tq = _torchao()
    if mode == "int8":
        return tq.Int8WeightOnlyConfig()
    if mode == "int8-dynamic":
        from torchao.utils import should_reduce_range

        # CPUs without VNNI would overflow the int8 x int8 products' accumulation: torchao's own advice
        return tq.Int8DynamicActivationInt8WeightConfig(reduce_range=should_reduce_range(device))
    if device.type == "cuda":
        return tq.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=group_size)


@functools.cache
def _probe(mode: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `mode` does not run on this device and dtype (a kernel that is missing or does not load),
    found by quantizing and running one small Linear; None when it runs."""
    try:
        layer = nn.Linear(256, 64, bias=False, device=device, dtype=dtype)
        _torchao().quantize_(layer, _config(mode, device))
        layer(torch.randn(2, 256, device=device, dtype=dtype))
    except UserError:
        raise
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return None


def check_quantize(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise a one-line UserError, naming a setting that works here, when `mode` cannot run on this
    device in this dtype."""
    if mode not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize {mode}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if mode == "none":
        return
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--quantize {mode} runs on CPU and CUDA, not {device.type}: use --quantize none there")
    if mode == "int8-dynamic" and device.type == "cuda":
        # measured on an H100 (StoryLlama, bf16): 3.3 tok/s decoding one sequence and 202 at 16, against
        # 1,062 and 14,758 unquantized; torch._int_mm takes no batch of 16 rows or fewer, which torchao
        # then runs another way, and that way cannot be captured as a CUDA graph (a failed capture
        # leaves the device unusable for the rest of the process)
        raise UserError("--quantize int8-dynamic is for CPUs: on CUDA, decoding falls off torchao's int8 kernels "
                        "(~300x slower on an H100): use --quantize int8 or int4")
    if mode == "int4" and device.type == "cuda" and dtype != torch.bfloat16:
        raise UserError(f"--quantize int4 on CUDA runs tinygemm, which takes bfloat16 weights, not {dtype}: "
                        "use --dtype bfloat16 (or auto), or --quantize int8")
    why = _probe(mode, device, dtype)
    if why is not None:
        works = [m for m in QUANTIZE_CHOICES[1:] if m != mode and _probe(m, device, dtype) is None]
        instead = f"--quantize {works[0]} does" if works else "use --quantize none"
        raise UserError(f"--quantize {mode} does not run on {device.type} in {dtype} here ({why}): {instead}")


class QuantizedExperts(nn.Module):
    """GroupedExperts with each expert's gate/up and down matrices as nn.Linear layers, which
    torchao quantizes and runs like any other Linear. The same function as GroupedExperts: a few
    tokens (a decode step) run every expert, mixed by weights that are zero off the chosen experts, in
    fixed shapes that a CUDA graph can capture; more tokens run each expert on its own rows."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self.n_experts, self.hidden = experts.n_experts, experts.hidden
        self.dense_max_tokens = experts.dense_max_tokens
        self.gate_up = nn.ModuleList(_linear(w.t()) for w in experts.gate_up.detach())
        self.down = nn.ModuleList(_linear(w.t()) for w in experts.down.detach())

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[e](x).split(self.hidden, dim=-1)
        return self.down[e](F.silu(gate) * up)

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.size(0) <= self.dense_max_tokens:
            mix = torch.zeros(x.size(0), self.n_experts, device=x.device, dtype=weights.dtype)
            mix.scatter_add_(1, expert_idx, weights)
            return sum((self.expert(e, x) * mix[:, e, None]).to(x.dtype) for e in range(self.n_experts))
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            token, slot = torch.nonzero(expert_idx == e, as_tuple=True)
            if token.numel():
                out.index_add_(0, token, (self.expert(e, x[token]) * weights[token, slot, None]).to(x.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding `weight` (out, in)."""
    layer = nn.Linear(weight.size(1), weight.size(0), bias=False, device="meta")
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    return layer


class QuantizedEmbedding(nn.Module):
    """A token table looked up in a torchao int8 matrix with one scale per row (the output head's,
    when the two are tied): each row is dequantized as it is read, as torchao dequantizes the whole
    matrix, so the table is stored once, in int8."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return (F.embedding(idx, w.qdata).float() * F.embedding(idx, w.scale)).to(w.dtype)


def _int4_group(layer: nn.Linear, device: torch.device) -> int | None:
    """The int4 group size for this layer's inputs; None where torchao's int4 cannot hold it (the CPU
    packing takes output widths that are multiples of 16; torchao pads them on CUDA)."""
    if device.type == "cpu" and layer.out_features % 16:
        return None
    return next((g for g in INT4_GROUP_SIZES if layer.in_features % g == 0), None)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Quantize `model` in place (see the module's docstring), after it is on its device and in its
    dtype; returns it. A mode that cannot run here raises UserError before the model is touched."""
    first = next(model.parameters())
    check_quantize(mode, first.device, first.dtype)
    if mode == "none":
        return model
    tq = _torchao()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, GroupedExperts):
                setattr(parent, name, QuantizedExperts(child))
    head = model.lm_head
    tied = model.tok_emb.weight is head.weight
    # the head is int8 in every mode; int8-dynamic's int8 head also quantizes its input rows
    tq.quantize_(head, _config("int8" if mode == "int4" else mode, first.device))
    model.tok_emb = QuantizedEmbedding(head.weight if tied else nn.Parameter(
        tq.Int8Tensor.from_hp(model.tok_emb.weight, tq.PerRow()), requires_grad=False))
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and m is not head and not name.endswith(NOT_QUANTIZED)}
    if mode != "int4":
        tq.quantize_(model, _config(mode, first.device), filter_fn=lambda m, name: name in layers)
        return model
    for group in INT4_GROUP_SIZES:  # a layer of no int4 group stays in the model's dtype
        chosen = {name for name, m in layers.items() if _int4_group(m, first.device) == group}
        if chosen:
            tq.quantize_(model, _config(mode, first.device, group),
                         filter_fn=lambda m, name, chosen=chosen: name in chosen)
    return model


def weights_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters occupy, read from their storage: a quantized weight as its integer
    data, scales and zero points; a storage shared by several (a tied embedding) counted once."""
    seen, total = set(), 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for p in model.parameters():
        add(p)
    return total
