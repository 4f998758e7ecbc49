#!/usr/bin/env bash
# Create .venv (once) and install SmolHub into it. torch is installed first, on its own: a bare
# `torch` requirement pulled in by pip's resolver could fetch a multi-GB build you do not want.
# An existing torch (CPU or CUDA) in the venv is kept. Override the torch spec with TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[test]"
python -c "import torch, smolhub; print(f'SmolHub ready: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}')"
