#!/usr/bin/env bash
# The 16-row tensor-core launches as served and with one piece of their inner loop taken out
# (bench/mma_whatifs.py says why), each what-if in its own copy of llm/ with the kernel's CUDA text
# edited; one device call (no carry needed), ~3 minutes:
#   bash bench/mma_whatifs.sh [ROWS, e.g. 16,8]   -> JSON lines, also in $OUT/mma-whatifs.jsonl
set -uo pipefail
rows=${1:-16}
out=${OUT:-.}
root=$PWD
kernel=llm/serving/nf4_mma.py
# name -> sed script; each must change the kernel text (checked below), or the what-if would time the served kernel
declare -A edits=(
    [served]=''
    [x_two_groups]='s/load_plain(x_lane\[set\] + group \* X_GROUP_STRIDE + /load_plain(x_lane[set] + (group \& 1) * X_GROUP_STRIDE + /'
    [no_decode]='/const u32 lo = prmt(prmt(L\[0\], L\[1\], sel)/,/second = prmt(lo, hi, 0x6273u);/c\    first = L[0] ^ L[1] ^ L[2] ^ L[3] ^ sel; second = H[0] ^ H[1] ^ H[2] ^ H[3] ^ pick;'
    [no_tables]='s/q\[i\] = bf16x2(__fmul_rn(scale, CODE\[2 \* i\]), __fmul_rn(scale, CODE\[2 \* i + 1\]));/q[i] = __float_as_uint(scale) + i;/'
)
status=0
for name in served x_two_groups no_decode no_tables; do
    copy=/tmp/mma-whatif-$name
    rm -rf "$copy" && mkdir -p "$copy" && cp -r "$root/llm" "$root/bench" "$copy/"
    if [[ -n "${edits[$name]}" ]]; then
        sed -i "${edits[$name]}" "$copy/$kernel"
        if cmp -s "$root/$kernel" "$copy/$kernel"; then
            echo "{\"what_if\": \"$name\", \"error\": \"the edit did not change $kernel\"}" | tee -a "$out/mma-whatifs.jsonl"
            status=1
            continue
        fi
    fi
    (cd "$copy" && PYTHONPATH="$copy" python3 bench/mma_whatifs.py --label "$name" --rows "$rows") 2>&1 \
        | tee -a "$out/mma-whatifs.jsonl" | grep -v '^$' | tail -n 8 || status=1
done
exit $status
