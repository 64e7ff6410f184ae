"""What a chain of kernel launches costs by itself on this GPU: LAUNCHES empty kernels in a row inside one
CUDA graph, each waiting for the one before it to finish (`griddepcontrol.wait` under programmatic launch,
as the decode step's kernels do, or plain stream order), at grid sizes like the decode step's (one block;
one wave of 132 blocks; the tensor-core kernels' 400-1,800 blocks). The result is the floor under any step
built of that many launches.

Why: `nf4`'s 16-row step is about 290 launches (9 a layer over 32 layers, the head and the sampler) in
4.3 ms on the H200 (run 43). Taking the copy of x out of the launches (run 44) or the small kernels around
them changed nothing measurable, so the fixed cost of the launches themselves is the next thing to
measure. If most of the step is that floor, only fewer launches can shorten it; if it is small, the time
is inside the kernels. Prints one JSON line per case. GPU only:

    PYTHONPATH=$PWD python3 bench/launch_floor.py [LAUNCHES]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.serving import programmatic_launch  # noqa: E402
from llm.serving.triton_kernels import graph_time_ms  # noqa: E402

# One store per block, so that each kernel has a result the next one must wait for.
SOURCE = r"""
extern "C" __global__ void empty_step(int* marks, int round) {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    if (threadIdx.x == 0) marks[blockIdx.x] = round;
}
"""

# (blocks, threads): one block; one wave on an H100/H200; the 16-row tensor-core launches' sizes
# (q/k/v 6144 / 16 + its A blocks, gate/up 28672 / 32 + A blocks)
GRIDS = [(1, 32), (132, 128), (416, 128), (1024, 128), (1808, 256)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launches", nargs="?", type=int, default=288, help="kernels in the chain (default 288)")
    launches = parser.parse_args().launches
    if launches < 1:
        parser.error(f"the chain needs at least one launch, got {launches}")
    if not torch.cuda.is_available():
        print("launch_floor.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    kernel = torch.cuda._compile_kernel(SOURCE, "empty_step")
    marks = torch.zeros(max(blocks for blocks, _ in GRIDS), dtype=torch.int32, device=device)
    print(json.dumps({"device": torch.cuda.get_device_name(device), "launches": launches,
                      "programmatic_launch_here": programmatic_launch.supported(device)}), flush=True)
    for blocks, threads in GRIDS:
        for programmatic in (True, False):
            def chain(blocks: int = blocks, threads: int = threads) -> None:
                for round_ in range(launches):
                    programmatic_launch.launch(kernel, (blocks, 1, 1), (threads, 1, 1), [marks, round_], device)

            if programmatic:
                ms = graph_time_ms(chain, replays=20)
            else:
                with programmatic_launch.serial_launches():
                    ms = graph_time_ms(chain, replays=20)
            print(json.dumps({"blocks": blocks, "threads": threads, "programmatic": programmatic,
                              "ms_per_chain": round(ms, 4), "us_per_launch": round(1000 * ms / launches, 3)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
