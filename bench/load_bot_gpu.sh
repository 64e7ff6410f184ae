#!/usr/bin/env bash
# The load benchmark through the real `finbot run` on a lent GPU (device tool), one engine mode after
# the other (default: fast,nf4), same checkpoint, same load:
#   bash bench/load_bot_gpu.sh [MODES]    -> $OUT/load_bot_<mode>.json, $OUT/finbot_<mode>.log (the bot's
#       own log at INFO: start-up, tuning, warnings), $OUT/load_bot_gpu.log
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
status=0
IFS=, read -ra modes <<< "${1:-fast,nf4}"
for mode in "${modes[@]}"; do
    echo "== ENGINE=$mode"
    python3 bench/load_bot.py --runs 1 --connect-timeout 420 --timeout 150 --idle-seconds 2 \
        --engine-env "ENGINE=$mode" --engine-env BASE_MODEL=/tmp/random-7b/base \
        --engine-env ADAPTER=/tmp/random-7b/adapter --engine-env LOG_LEVEL=INFO --out "${OUT:-.}/load_bot_$mode.json" \
        --bot-log "${OUT:-.}/finbot_$mode.log" > "/tmp/load_bot_$mode.out" || rc=$?
    if [[ ${rc:-0} != 0 ]]; then
        status=1
        echo "ENGINE=$mode: the load run failed (exit $rc); its output and the bot's log end with:"
        tail -n 20 "/tmp/load_bot_$mode.out"; tail -n 20 "${OUT:-.}/finbot_$mode.log" 2>/dev/null || true
    fi
    rc=0
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r.get(k) for k in ('start_to_connected_s', 'answered', 'lost', 'duplicated', 'event_to_first_text', 'event_to_final', 'load_s')})" \
        "${OUT:-.}/load_bot_$mode.json" 2>/dev/null || true
done
exit $status
