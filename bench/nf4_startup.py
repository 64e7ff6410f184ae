"""The `nf4` kernel tuner's start-up on a fresh machine: its NVRTC compiles one at a time against on
several threads (GPU, device tool). Prints JSON lines, one per run, then the ratio.

Each run is its own process with the driver's JIT cache off (`CUDA_CACHE_DISABLE=1`), so that both
compile everything, as the first start on a fresh machine (or a fresh container) does. The weights
are random NF4 in the 7B layer shapes, two layers per projection (the compiles do not depend on the
number of layers; the timing replays do, a little).

    python bench/nf4_startup.py [--threads 1,8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LAYERS = 2


def run_tuner(threads: int) -> dict:
    """One tuning, as `build_nf4_engine` runs it, of fresh kernels on `threads` compile threads."""
    import time

    import torch
    from nf4_kernels import SHAPES, projection  # bench/nf4_kernels.py

    from llm.serving import nf4_kernels

    groups = {name: [projection(parts, cols, seed) for seed in range(LAYERS)] for name, (parts, cols) in SHAPES.items()}
    torch.cuda.synchronize()
    started = time.perf_counter()
    plan = nf4_kernels.tune(groups, [1, 2, 4, 8, 16], compile_threads=threads)
    seconds = time.perf_counter() - started
    chosen = {key: value for key, value in plan.items() if key.startswith("m")}
    return {"compile_threads": threads, "tune_s": round(seconds, 1), "precompile_s": plan.get("precompile_s"),
            "precompiled_kernels": plan.get("precompiled_kernels"),
            # a compile failure turns to the Triton kernels: this count says so at a glance
            "tensor_core_choices": f"{sum(label.startswith('mma') for label in chosen.values())} of {len(chosen)}",
            "plan": chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,8", help="compile threads per run, e.g. 1,8")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(run_tuner(args.child)), flush=True)
        return
    try:
        choices = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must be comma-separated numbers, got {args.threads!r}")
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: run it through the device tool (bench/NOTES.md, Reproduce)")
    results = []
    for threads in choices:
        env = {**os.environ, "CUDA_CACHE_DISABLE": "1"}
        done = subprocess.run([sys.executable, __file__, "--child", str(threads)], env=env, capture_output=True,
                              text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(json.dumps({"compile_threads": threads, "error": (done.stderr or done.stdout)[-2000:]}), flush=True)
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        results.append(result)
        print(json.dumps(result), flush=True)
    if len(results) > 1:
        base = results[0]
        print(json.dumps({
            "tune_s": {r["compile_threads"]: r["tune_s"] for r in results},
            "speed_up_vs_first": {r["compile_threads"]: round(base["tune_s"] / r["tune_s"], 2) for r in results},
            "same_plan_as_first": {r["compile_threads"]: r["plan"] == base["plan"] for r in results},
        }), flush=True)


if __name__ == "__main__":
    main()
