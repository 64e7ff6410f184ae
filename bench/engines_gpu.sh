#!/usr/bin/env bash
# One device call that checks and measures the model side at this commit: the GPU tests, then the
# engine benchmark (the seed's literal code path, `nf4` and `fast`, same prompts, ratios printed).
#   bash bench/engines_gpu.sh COMMIT [CASES]      (device tool, carry: [".whl", ".tok"]; ~8 minutes)
# Writes to $OUT (at most 8 files come back): gpu-tests.txt, engines.log and r.tgz (the results
# JSON, the chart and the profiles). A run cut off by the device's time limit keeps what it wrote.
set -uo pipefail
commit=${1:?usage: bash bench/engines_gpu.sh COMMIT [CASES]}
cases=${2:-seed-literal,nf4,fast}
out=${OUT:-.}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "cannot install the carried bitsandbytes wheel (.whl): see bench/NOTES.md, Reproduce"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 FINBOT_TOKENIZER_FILE="$PWD/.tok/tokenizer.model.v1"
python3 -m pytest tests/gpu -q -p no:cacheprovider > "$out/gpu-tests.txt" 2>&1
tail -n 3 "$out/gpu-tests.txt"
python3 bench/bench_engines.py --commit "$commit" --tokenizer-file .tok/tokenizer.model.v1 --cases "$cases" \
    --out /tmp/r > "$out/engines.log" 2>&1
tail -n 6 "$out/engines.log"
tar czf "$out/r.tgz" -C /tmp r
