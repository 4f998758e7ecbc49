#!/usr/bin/env bash
# The offline quick start: install, train a tiny StoryLlama on synthetic stories, generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
cd StoryLlama
python trainer.py --preset tiny --dataset synthetic --max_steps 200 --overwrite   # --overwrite: a rerun replaces the last one
python inference.py --checkpoint out/StoryLlama --prompt "Once upon a time" --temperature 0.8 --top_p 0.9 --max_new_tokens 60
