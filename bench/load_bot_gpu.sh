#!/usr/bin/env bash
# The load benchmark through the real `finbot run` with ENGINE=fast, on a lent GPU (device tool).
# Builds a random Mistral-7B + LoRA of the seed's shape on the GPU (no download), then drives the bot
# with bench/load_bot.py. Needs carried wheels: .whl (bitsandbytes) and .whl2 (the bot's own
# dependencies missing on the GPU image), and .tok/tokenizer.model.v1 (see bench/NOTES.md).
set -euo pipefail
# Everything also goes to $OUT, so a run cut off by the device's time limit still reports how far it got.
exec > >(tee "${OUT:-.}/load_bot_gpu.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl2/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
started=$(date +%s)
python3 - <<'PY'
from pathlib import Path

from llm.synthetic import build_random_checkpoint, mistral_7b_config

build_random_checkpoint(
    Path("/tmp/random-7b"), mistral_7b_config(), device="cuda", tokenizer_file=Path(".tok/tokenizer.model.v1")
)
PY
echo "random 7B checkpoint written in $(( $(date +%s) - started )) s"
python3 bench/load_bot.py --runs 1 --connect-timeout 420 --timeout 150 --idle-seconds 2 \
    --engine-env ENGINE=fast --engine-env BASE_MODEL=/tmp/random-7b/base --engine-env ADAPTER=/tmp/random-7b/adapter \
    --out "${OUT:-.}/load_bot_fast.json"
