"""Hand-written Triton kernels for CUDA, each beside a pure-torch path that runs everywhere else.
Imported only when a CUDA tensor needs them, so CPU installs never import triton."""
