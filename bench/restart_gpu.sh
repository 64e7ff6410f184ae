#!/usr/bin/env bash
# A restart of `finbot run` with ENGINE=nf4 on a lent GPU (device tool, carry: [".whl", ".whl2", ".tok"]),
# with and without the tuner's plan kept on disk (ENGINE_TUNING_CACHE), through the real bot and the
# fake Slack server, the same random Mistral-7B + LoRA checkpoint each time:
#   1. first start on this machine, no plan stored yet: it tunes and stores its plan
#   2. restart with ENGINE_TUNING_CACHE empty: tunes again (every start did this before the cache)
#   3. restart with the plan from start 1: checks the stored layouts instead of timing them all
# Each start then answers a small load (MENTIONS mentions, default 16, and a follow-up in each thread),
# so that the restarted engine is seen to answer, not only to start.
#   bash bench/restart_gpu.sh   -> $OUT/restart_<n>.json (bench/load_bot.py's results), $OUT/finbot_restart_<n>.log
#       (the bot's INFO log: the tuner's lines), $OUT/restart.json (the summary), $OUT/restart_gpu.log
set -euo pipefail
out=${OUT:-.}
exec > >(tee "$out/restart_gpu.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl2/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
plan=/tmp/finbot-restart-nf4-tuning.json
rm -f "$plan"
python3 - <<'PY'
from pathlib import Path

from llm.synthetic import build_random_checkpoint, mistral_7b_config

build_random_checkpoint(
    Path("/tmp/random-7b"), mistral_7b_config(), device="cuda", tokenizer_file=Path(".tok/tokenizer.model.v1")
)
PY
status=0
for start in 1 2 3; do
    cache=$plan
    [[ $start == 2 ]] && cache=""
    echo "== start $start: ENGINE=nf4 ENGINE_TUNING_CACHE=$cache"
    python3 bench/load_bot.py --runs 1 --connect-timeout 420 --timeout 150 --idle-seconds 1 \
        --threads "${MENTIONS:-16}" --spread 2 \
        --engine-env ENGINE=nf4 --engine-env BASE_MODEL=/tmp/random-7b/base --engine-env ADAPTER=/tmp/random-7b/adapter \
        --engine-env LOG_LEVEL=INFO --engine-env "ENGINE_TUNING_CACHE=$cache" \
        --out "$out/restart_$start.json" --bot-log "$out/finbot_restart_$start.log" > "/tmp/restart_$start.out" \
        || { status=1; echo "start $start failed:"; tail -n 20 "/tmp/restart_$start.out"; tail -n 20 "$out/finbot_restart_$start.log" || true; }
    grep -E "nf4 kernels|nf4 tuning cache|nf4: timing" "$out/finbot_restart_$start.log" | cut -c1-400 || true
done
python3 - "$out" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
names = {1: "first start, plan stored", 2: "restart, tuned again (ENGINE_TUNING_CACHE empty)", 3: "restart, stored plan"}
rows = {}
for start, name in names.items():
    try:
        result = json.loads((out / f"restart_{start}.json").read_text())
    except (OSError, ValueError):
        continue
    rows[start] = {"start": name, "start_to_connected_s": result.get("start_to_connected_s"),
                   "answered": result.get("answered"), "lost": result.get("lost")}
summary = {"starts": list(rows.values())}
if 2 in rows and 3 in rows and rows[3]["start_to_connected_s"]:
    summary["restart_s_saved"] = round(rows[2]["start_to_connected_s"] - rows[3]["start_to_connected_s"], 1)
    summary["restart_speed_up"] = round(rows[2]["start_to_connected_s"] / rows[3]["start_to_connected_s"], 2)
(out / "restart.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
PY
exit $status
