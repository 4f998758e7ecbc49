"""Hand-written Triton kernels for CUDA, each beside a pure-torch path that runs everywhere else.
The kernel modules are imported only when a CUDA tensor needs them (or triton's interpreter runs them
on the CPU, as the tests do), so CPU installs never import triton."""
import os

import torch


def triton_available(x: torch.Tensor, interpreter: bool = False) -> bool:
    """Whether a kernel can run on x: a CUDA tensor, and triton (which ships with CUDA builds of
    torch on Linux) importable. interpreter=True, for a kernel the user asked for by name, also
    takes a CPU tensor while triton's interpreter is on (TRITON_INTERPRET=1, set before triton is
    imported), which runs the kernels on the CPU, slowly; the automatic kernel choices leave it False,
    so the interpreter never replaces their torch paths."""
    if not (x.is_cuda or (interpreter and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
