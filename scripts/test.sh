#!/usr/bin/env bash
# Install everything the test suite needs (venv, Debian's chromium for the browser tests) and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -x /usr/bin/chromium ]; then
    echo "installing Debian's chromium for the browser tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
fi
. .venv/bin/activate
# CPU builds of torch come without triton; the tests run the Triton kernels in its interpreter (3.9: the
# interpreter of earlier versions fails on numpy >= 2.4)
if ! python -c "import triton" 2>/dev/null; then
    python -m pip install -q "triton==3.9.0"
fi
export GRADIO_ANALYTICS_ENABLED=False WANDB_MODE=disabled
python -m pytest -n 2 --durations=15 "$@"
