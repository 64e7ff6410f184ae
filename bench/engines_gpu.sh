#!/usr/bin/env bash
# The model side checked and measured on a lent GPU (device tool, carry: [".whl", ".tok"]), one
# device call each (each within a call's 10-minute limit):
#   bash bench/engines_gpu.sh tests [PYTEST ARGS]   tests/gpu, or only the test files named in PYTEST ARGS (all:
#       ~7 minutes on a fresh H200; more than a call's 10 on a fresh H100 (run 44): there, two calls,
#       `tests tests/gpu/test_nf4_kernels.py` and `tests --ignore=tests/gpu/test_nf4_kernels.py`), its 20 slowest
#       tests listed -> $OUT/gpu-tests.txt
#   bash bench/engines_gpu.sh kernels            run 24's served layouts with other shared code pairs: their bits
#       (`tests/gpu -k variants`) and timings (`bench/nf4_kernels.py 1,16 --variants`)
#       -> $OUT/kernels*.txt
#   bash bench/engines_gpu.sh splits             K split across blocks and programmatic launch: their GPU
#       tests, and run 24's served layouts with K splits timed (q/k/v, o, down; 1 and 16 rows)
#       -> $OUT/splits*.txt
#   bash bench/engines_gpu.sh timeline [LAYOUTS]  where each layout's launches spend their time
#       (`bench/xtab_timeline.py`, the served layouts by default), then the x-table kernels' GPU tests (~5 minutes)
#       -> $OUT/gpu-tests.txt, $OUT/timeline.jsonl
#   bash bench/engines_gpu.sh prompts            the prompt path's GPU tests (`-k prompt`: the seed's bits, graph
#       replays), then its timings at 32 and 288 rows (`bench/nf4_kernels.py --prompts 32,288`; ~3 minutes)
#       -> $OUT/prompts*
#   bash bench/engines_gpu.sh bench COMMIT [CASES [BENCH OPTIONS]]  the engine benchmark: the seed's literal
#       code path, `nf4` and `fast` by default, same prompts, ratios printed (~4 minutes; options such as
#       --xtab-layouts 16x1,8x1 go to bench_engines.py; COMMIT: the measured commit's hash, typed into the
#       call, which the results file records)
#       -> $OUT/engines.log, $OUT/r.tgz (the results JSON, the chart and the profiles)
#   bash bench/engines_gpu.sh prompt-base COMMIT  the fused prompt base: its GPU tests (cuBLAS's bits in the 24 prompt
#       shapes; per shape its plan, each layout's time against dequantize + cuBLAS: the NF4_PROMPT_BASE lines), then,
#       only if they pass, the engine benchmark (seed-literal,nf4,fast) with it served where it plans faster
#       (`--fused-prompt-base`; ~7 minutes)
#       -> $OUT/gpu-tests.txt, $OUT/engines.log, $OUT/r.tgz
#   bash bench/engines_gpu.sh tests-then-bench COMMIT CASES [PYTEST ARGS]  `tests` with PYTEST ARGS (e.g. -k to
#       pick the tests of what changed), then, only if they pass, `bench COMMIT CASES`: a session's usual call
#       -> $OUT/gpu-tests.txt, $OUT/engines.log, $OUT/r.tgz
set -uo pipefail
if [[ "${1:-}" != tests && "${1:-}" != bench && "${1:-}" != kernels && "${1:-}" != splits && "${1:-}" != timeline
      && "${1:-}" != prompts && "${1:-}" != tests-then-bench && "${1:-}" != prompt-base ]]; then
    echo "usage: bash bench/engines_gpu.sh tests [PYTEST ARGS] | kernels | splits | timeline [LAYOUTS] | prompts | bench COMMIT [CASES [OPTIONS]] | tests-then-bench COMMIT CASES [PYTEST ARGS] | prompt-base COMMIT"
    exit 2
fi
out=${OUT:-.}
# The device's copy of the tree has no git history: a name such as HEAD would be all the results file says
# of what was measured (runs 45-46). Checked first, before a tests-then-bench call spends minutes on tests.
if [[ ( "$1" == bench || "$1" == tests-then-bench || "$1" == prompt-base ) && ! "${2:-}" =~ ^[0-9a-f]{7,40}$ ]]; then
    echo "COMMIT must be the measured commit's hash (git rev-parse --short HEAD here, typed into the call), got '${2:-}'"
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "cannot install the carried bitsandbytes wheel (.whl): see bench/NOTES.md, Reproduce"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 FINBOT_TOKENIZER_FILE="$PWD/.tok/tokenizer.model.v1"
# bench COMMIT CASES [OPTIONS]: bench_engines.py -> $out/engines.log, $out/r.tgz
bench() {
    python3 bench/bench_engines.py --commit "$1" --tokenizer-file .tok/tokenizer.model.v1 --cases "$2" --out /tmp/r \
        "${@:3}" > "$out/engines.log" 2>&1
    tail -n 6 "$out/engines.log"
    tar czf "$out/r.tgz" -C /tmp r
}
# gpu_tests [PYTEST ARGS]: tests/gpu, or only the test files named -> $out/gpu-tests.txt. (With tests/gpu in
# front of named files as well, pytest runs all of it in file order: run 44's calls 1 and 3 ran other files
# first and never reached the ones named.)
gpu_tests() {
    local where=tests/gpu arg
    for arg in "$@"; do [[ "$arg" == tests/* ]] && where=""; done
    python3 -m pytest ${where} -q -p no:cacheprovider --durations=20 "$@" > "$out/gpu-tests.txt" 2>&1
}
case "${1:-}" in
    tests)
        shift
        gpu_tests "$@"
        tail -n 3 "$out/gpu-tests.txt"
        ;;
    kernels)
        python3 -m pytest tests/gpu/test_nf4_kernels.py -q -p no:cacheprovider -k variants \
            > "$out/kernels-tests.txt" 2>&1
        tail -n 1 "$out/kernels-tests.txt"
        python3 bench/nf4_kernels.py 1,16 --variants > "$out/kernels-variants.txt" 2>&1
        tail -n 2 "$out/kernels-variants.txt" | cut -c1-600
        ;;
    splits)
        python3 -m pytest tests/gpu -q -p no:cacheprovider -k "splitting or programmatic" > "$out/splits-tests.txt" 2>&1
        tail -n 1 "$out/splits-tests.txt"
        python3 bench/nf4_kernels.py 1,16 --k-splits --projections qkv,o,down > "$out/splits-kernels.txt" 2>&1
        tail -n 3 "$out/splits-kernels.txt" | cut -c1-600
        ;;
    timeline)
        # The timeline first: its figures come back even if the tests then run past the call's limit
        python3 bench/xtab_timeline.py ${2:+--layouts "$2"} > "$out/timeline.jsonl" 2>&1
        cut -c1-400 "$out/timeline.jsonl"
        python3 -m pytest tests/gpu -q -p no:cacheprovider -k xtab > "$out/gpu-tests.txt" 2>&1
        tail -n 3 "$out/gpu-tests.txt"
        ;;
    prompts)
        python3 -m pytest tests/gpu/test_nf4_kernels.py -q -p no:cacheprovider -k prompt > "$out/prompts-tests.txt" 2>&1
        tail -n 3 "$out/prompts-tests.txt"
        python3 bench/nf4_kernels.py --prompts 32,288 > "$out/prompts-timings.jsonl" 2>&1
        cut -c1-600 "$out/prompts-timings.jsonl"
        ;;
    tests-then-bench)
        commit=${2:?usage: bash bench/engines_gpu.sh tests-then-bench COMMIT CASES [PYTEST ARGS]}
        cases=${3:?usage: bash bench/engines_gpu.sh tests-then-bench COMMIT CASES [PYTEST ARGS]}
        shift 3
        gpu_tests "$@"
        status=$?
        tail -n 3 "$out/gpu-tests.txt"
        if [[ $status != 0 ]]; then
            echo "tests failed (exit $status): no bench; see gpu-tests.txt"
            exit $status
        fi
        bench "$commit" "$cases"
        ;;
    prompt-base)
        gpu_tests tests/gpu/test_nf4_prompt_base.py -s
        status=$?
        grep -o 'NF4_PROMPT_BASE .*' "$out/gpu-tests.txt" | cut -c17-400
        tail -n 3 "$out/gpu-tests.txt"
        if [[ $status != 0 ]]; then
            echo "tests failed (exit $status): no bench; see gpu-tests.txt"
            exit $status
        fi
        bench "$2" seed-literal,nf4,fast --fused-prompt-base
        ;;
    bench)
        bench "${2:?usage: bash bench/engines_gpu.sh bench COMMIT [CASES [OPTIONS]]}" "${3:-seed-literal,nf4,fast}" "${@:4}"
        ;;
esac
