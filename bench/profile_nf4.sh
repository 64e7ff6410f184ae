#!/usr/bin/env bash
# Nsight Compute sections of nf4 decode kernels (device tool; needs the bitsandbytes wheel on PYTHONPATH).
#   bash bench/profile_nf4.sh gate_up:1:mma_16x256w4s1 down:16:mma_16x256w8s1 ...
#   NCU_SECTIONS="--set full" bash bench/profile_nf4.sh ...   (pipe utilization, SASS mix)
#   NCU_STALLS=1 bash bench/profile_nf4.sh ...   (+ why warps wait: cycles per issued instruction by stall reason)
# One file per target in $OUT: ncu-<projection>-m<rows>-<config>.txt (the LoRA A kernel, then the GEMV).
set -u
out=${OUT:-.}
stalls=()
if [[ "${NCU_STALLS:-0}" == 1 ]]; then
    reasons=(long_scoreboard short_scoreboard wait math_pipe_throttle mio_throttle barrier not_selected
             dispatch_stall lg_throttle no_instruction selected)
    metrics=$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' "${reasons[@]}")
    stalls=(--metrics "${metrics%,}")
fi
for target in "$@"; do
    IFS=: read -r projection rows config <<<"$target"
    ncu --clock-control none --kernel-name regex:"nf4_mma|_nf4_|_lora_a" --launch-skip 2 --launch-count 2 \
        ${NCU_SECTIONS:---section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis} "${stalls[@]}" \
        python3 bench/nf4_kernels.py --profile "$projection" "$rows" "$config" \
        > "$out/ncu-$projection-m$rows-$config.txt" 2>&1 || echo "ncu failed for $target (see the file)"
done
