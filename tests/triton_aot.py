"""Compile the Triton MoE kernels for an H100 (sm_90), an A100 (sm_80) and an Ada card (sm_89) on a
machine without a GPU, as their launches would: `python tests/triton_aot.py` prints one JSON line per
GPU and launch of a training step's forward and backward. Run by tests/test_moe.py in a subprocess,
without TRITON_INTERPRET (the interpreter replaces the kernels that this compiles).

The launches are recorded by running the real launchers (smolhub.kernels.moe.scattered_experts and
its backward) on meta tensors with the kernels swapped for recorders; each is then compiled through
ptxas (shipped in the triton wheel) with the specialisation triton's JIT would give those arguments:
16-byte-aligned pointers, ints equal to 1 as constants, ints divisible by 16 marked so. That is what
decides whether the loads vectorise and the K loop is pipelined (its shared memory grows with
num_stages), so a compile error, a kernel over the shared-memory budget, a loop left unpipelined or
registers spilled to memory show here before a GPU session.
"""
import json
import os
import re
import subprocess
import tempfile

import torch

SHAPES = dict(tokens=4096, dim=512, hidden=1024, n_experts=8, k=2)  # StoryMixtral's MoE layer
# H100 (the benchmarks' card), A100, and the Ada cards (L4, RTX 4090) with the least shared memory a block
CAPABILITIES = (90, 80, 89)
DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


class Recorder:
    """Stands in for a JITFunction: kernel[grid](*args, **kwargs) records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def record_launches() -> list:
    from smolhub.kernels import moe as kernels

    launches: list = []
    rows_kernel, weight_grad_kernel = kernels._rows_kernel, kernels._weight_grad_kernel
    kernels._rows_kernel = Recorder(rows_kernel, launches)
    kernels._weight_grad_kernel = Recorder(weight_grad_kernel, launches)
    try:
        N, d, h, E, k = (SHAPES[n] for n in ("tokens", "dim", "hidden", "n_experts", "k"))
        meta = dict(device="meta", dtype=torch.bfloat16)
        x, gate_up, down = torch.empty(N, d, **meta), torch.empty(E, d, 2 * h, **meta), torch.empty(E, h, d, **meta)
        order = torch.empty(N * k, device="meta", dtype=torch.int32)
        ends = torch.empty(E, device="meta", dtype=torch.int32)
        token_of = order // k
        out, pre, act = kernels.scattered_experts(x, gate_up, down, order, token_of, ends)
        kernels.scattered_experts_backward(torch.empty_like(out), x, gate_up, down, order, token_of, ends, pre, act)
    finally:
        kernels._rows_kernel, kernels._weight_grad_kernel = rows_kernel, weight_grad_kernel
    return launches


def compile_for(fn, args: tuple, kwargs: dict, capability: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages")}
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = values[name]
        if name in kwargs or value is None or (isinstance(value, int) and value == 1):
            signature[name], constants[name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", capability, 32),
                          options=options)


def spill_bytes(ptx: str, capability: int) -> int:
    """Bytes of registers spilled to local memory, from `ptxas -v` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = f"sm_{capability}" + ("a" if capability == 90 else "")
        info = subprocess.run([get_ptxas(capability).path, f"-arch={arch}", "-v", path, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", info))


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: the interpreter compiles nothing"
    for capability in CAPABILITIES:
        for fn, args, kwargs in record_launches():
            flags = {name: value for name, value in kwargs.items() if name.isupper() and isinstance(value, bool)}
            compiled = compile_for(fn, args, dict(kwargs), capability)
            ptx = compiled.asm["ptx"]
            print(json.dumps({"capability": capability, "kernel": fn.__name__, "flags": flags,
                              "blocks": [value for name, value in kwargs.items() if name.startswith("BLOCK_")],
                              "num_stages": kwargs["num_stages"], "shared": compiled.metadata.shared,
                              "wgmma": "wgmma.mma_async" in ptx, "spill_bytes": spill_bytes(ptx, capability)}),
                  flush=True)


if __name__ == "__main__":
    main()
