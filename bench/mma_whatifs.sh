#!/usr/bin/env bash
# The 16-row tensor-core launches as served and with one piece of their inner loop taken out
# (bench/mma_whatifs.py says why), each what-if in its own copy of llm/ with the kernel's CUDA text
# edited; one device call (no carry needed), ~3 minutes:
#   [WHATIFS="served no_mma"] bash bench/mma_whatifs.sh [ROWS, e.g. 16,8]   -> JSON lines, also in
#       $OUT/mma-whatifs.jsonl (the what-ifs: the default list below; WHATIFS=all: every one)
#   EDIT_ONLY=DIR bash bench/mma_whatifs.sh   only the edited copies, in DIR/NAME (no GPU:
#       tests/test_mma_whatifs.py checks that every edit still applies and compiles)
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
    [weights_two_groups]='s/lane_words\[q\] + 8 \* grp/lane_words[q] + 8 * (grp \& 1)/g'
    [no_mma]='/asm("mma.sync.aligned.m16n8k16/,/: "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));/c\    d[0] += __uint_as_float(a0 ^ b0); d[1] += __uint_as_float(a1 ^ b1); d[2] += __uint_as_float(a2); d[3] += __uint_as_float(a3);'
    [half_k]='s/group < end_group; group += /group < first_group + (end_group - first_group) \/ 2; group += /; s/if (group + WARPS >= end_group) break;/if (group + WARPS >= first_group + (end_group - first_group) \/ 2) break;/'
    [quarter_k]='s/group < end_group; group += /group < first_group + (end_group - first_group) \/ 4; group += /; s/if (group + WARPS >= end_group) break;/if (group + WARPS >= first_group + (end_group - first_group) \/ 4) break;/'
    [no_lora_b]='s/for (int r = 0; r < RANK; ++r) u += b_tile\[f\]\[r\] \* t_sum\[m\]\[r\];/u = t_sum[m][f \& (RANK - 1)];/'
    [no_a]='s|if ((int)blockIdx.x < la_blocks) {  // a LoRA A block: one unit per warp at a time|if ((int)blockIdx.x < la_blocks) { return;|; s|wait_until(&counters\[XQ_READY\], groups \* A_ROW_CHUNKS);|(void)0;|; s|wait_until(&counters\[T_READY\], (RT >> 2) \* A_ROW_CHUNKS);|(void)0;|'
    [b_tile_first]='/^    load_b_tile();$/d; s/^    LaneGroup current = fetch(first_group + warp);$/    load_b_tile();\n&/; s/^    LaneGroup first = fetch(first_group + warp), second = fetch(first_group + warp + WARPS);$/    load_b_tile();\n&/'
    [a_blocks_8]='s|^    return -(-units // warps)$|    return min(-(-units // warps), 8)|'
    [a_blocks_16]='s|^    return -(-units // warps)$|    return min(-(-units // warps), 16)|'
    [a_blocks_32]='s|^    return -(-units // warps)$|    return min(-(-units // warps), 32)|'
    [a_blocks_64]='s|^    return -(-units // warps)$|    return min(-(-units // warps), 64)|'
    [trigger_after_loop]='/^    next_kernel_may_start();$/d; s/^    STAMP_AFTER(3, /    next_kernel_may_start();\n&/'
    [trigger_after_t]='/^    next_kernel_may_start();$/d; s/^    STAMP(4);$/    next_kernel_may_start();\n&/'
    [no_x_wait]='s|wait_until(\&counters\[XQ_READY\], groups \* A_ROW_CHUNKS);|(void)0;|'
    [no_t_wait]='s|wait_until(\&counters\[T_READY\], (RT >> 2) \* A_ROW_CHUNKS);|(void)0;|'
    [more_blocks_per_sm]='s/__launch_bounds__(WARPS \* 32)$/__launch_bounds__(WARPS * 32, 16 \/ WARPS)/'
    [no_tables]='s/q\[i\] = bf16x2(__fmul_rn(scale, CODE\[2 \* i\]), __fmul_rn(scale, CODE\[2 \* i + 1\]));/q[i] = __float_as_uint(scale) + i;/'
)
status=0
names=${WHATIFS:-served x_two_groups no_decode no_tables weights_two_groups no_mma half_k quarter_k no_lora_b no_a b_tile_first}
[[ "$names" == all || -n "${EDIT_ONLY:-}" ]] && names="${!edits[*]}"
for name in $names; do
    if [[ -z "${edits[$name]+set}" ]]; then
        echo "{\"what_if\": \"$name\", \"error\": \"no such what-if; known: ${!edits[*]}\"}" | tee -a "$out/mma-whatifs.jsonl"
        status=1
        continue
    fi
    copy=${EDIT_ONLY:-/tmp}/mma-whatif-$name
    rm -rf "$copy" && mkdir -p "$copy" && cp -r "$root/llm" "$root/bench" "$copy/"
    if [[ -n "${edits[$name]}" ]]; then
        sed -i "${edits[$name]}" "$copy/$kernel"
        if cmp -s "$root/$kernel" "$copy/$kernel"; then
            echo "{\"what_if\": \"$name\", \"error\": \"the edit did not change $kernel\"}" | tee -a "$out/mma-whatifs.jsonl"
            status=1
            continue
        fi
    fi
    [[ -n "${EDIT_ONLY:-}" ]] && continue
    (cd "$copy" && PYTHONPATH="$copy" python3 bench/mma_whatifs.py --label "$name" --rows "$rows") 2>&1 \
        | tee -a "$out/mma-whatifs.jsonl" | grep -v '^$' | tail -n 40 || status=1
done
exit $status
