"""Hand-written Triton kernels for CUDA, each beside a pure-torch path that runs everywhere else.
The kernel modules are imported only when a CUDA tensor needs them (or triton's interpreter runs them
on the CPU, as the tests do), so CPU installs never import triton."""
import torch


def triton_available(x: torch.Tensor) -> bool:
    """Whether a kernel can run on x: a CUDA tensor, and triton (which ships with CUDA builds of
    torch on Linux) importable."""
    if not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
