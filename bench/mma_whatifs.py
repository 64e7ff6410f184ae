"""Where a 16-row tensor-core launch spends its time: the served layouts timed as they are and with
one piece of their inner loop taken out (timing only: the outputs of a what-if are wrong).

Why: at 16 rows the fused `nf4` launches take 2.9-6 x their weight bytes' time (run 43, H200: q/k/v
17.7 µs a layer, o 13.8, gate/up 45.6, down 28.3), and each weight block reads all of x (16 rows, in
operand order): 128 KB a block at K = 4,096, 459 KB at 14,336, ~10 GB a step over the ~1,700 blocks of
a layer's four launches, twice the weights' 4.5 GB. Run 29 measured a layout that reads x once a block
(`split-n`) slower, but that layout also changed how many warps walk K. These what-ifs change one
thing each, by editing the kernel's CUDA text before it is compiled (`bench/mma_whatifs.sh` runs this
script once per edited copy of the repository):

- `x_two_groups`: every group's x loads read group 0's or group 1's values, so after the first two
  groups x comes from L1 (its L2 traffic gone; the loads stay);
- `no_decode`: each word's weights are its block's table registers XOR-ed together (once per block)
  and with its nibble selectors, instead of 6 byte permutes per four weights (the tables are still built);
- `weights_two_groups`: every group's weight loads read group 0's or group 1's bytes, so they come
  from L2 instead of HBM (the loads and everything after them stay);
- `no_mma`: each MMA is four float additions of its operands' bits (the accumulators' chains of
  tensor-core latency gone);
- `half_k`, `quarter_k`: each warp's loop over its groups stops half or a quarter of the way (the
  rest of the launch as served): how much of the time the loop is, and how much the launch's fixed costs;
- `no_lora_b`: the epilogue's LoRA `B` product left out (t read once per output instead);
- `no_a`: the fused launch's LoRA `A` blocks return at once and nothing waits for x in operand order
  or for t (the A product's work, its blocks' time on the SMs and both waits gone);
- `b_tile_first`: the LoRA `B` rows loaded into shared memory before the first weights are asked
  for, as before run 45 (a real alternative, not a what-if: its outputs are right);
- `a_blocks_8` .. `a_blocks_64`: at most that many fused LoRA `A` blocks, each warp taking several units in
  turn (outputs right; run 46: 8, 16 and 32 all slower), so that more weight blocks fit in the first wave;
- `trigger_after_loop`, `trigger_after_t`: the next launch released after the weight loop or after t instead
  of at the start (outputs right; run 46: slower);
- `no_x_wait`, `no_t_wait`: the weight blocks skip their wait for x in operand order, or for t (run 46: no
  gain at 16 rows);
- `more_blocks_per_sm`: launch bounds asking for 16 warps per SM, so that ptxas holds a 4-warp layout to 128
  registers (q/k/v's: 134 registers, 3 blocks per SM, 396 slots for its 768 blocks; 4 per SM with no spills;
  run 47: q/k/v at 16 rows 12 % slower, the rest unchanged);
- `no_tables`: the per-block tables are the absmax's bits plus a constant instead of 16 products
  and 8 conversions per 64 weights.

Prints one JSON line per projection and row count: µs a layer (8 random layers in a CUDA graph),
the layout, and the weight bytes' time at this GPU's copy bandwidth.

    PYTHONPATH=$PWD python3 bench/mma_whatifs.py --label served [--rows 16,8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import torch  # noqa: E402

from llm.serving import nf4_kernels  # noqa: E402
from llm.serving.nf4 import BLOCK_SIZE, NF4_CODE, LoraParts, NF4Matrix  # noqa: E402
from llm.serving.triton_kernels import graph_time_ms  # noqa: E402

# projection: (output parts, K, the layout the H200's tuner served at 16 rows in run 43)
PROJECTIONS = {"qkv": ([4096, 1024, 1024], 4096, "mma_16x256w4s2f"), "o": ([4096], 4096, "mma_16x256w8s2f"),
               "gate_up": ([14336, 14336], 4096, "mma_32x256w4s1ft2"), "down": ([4096], 14336, "mma_16x256w8s1f")}
LAYERS = 8  # distinct copies, so that L2 does not hold one launch's weights for the next


def random_projection(parts: list[int], k: int, seed: int) -> tuple[NF4Matrix, LoraParts]:
    """Random NF4 bytes and absmax of the real shape (no bitsandbytes needed: timing only)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    n = sum(parts)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=generator)
    absmax = torch.rand((n, k // BLOCK_SIZE), device="cuda", generator=generator) * 0.05
    weight = NF4Matrix(packed=packed, absmax=absmax, code=torch.tensor(NF4_CODE, device="cuda"))
    a = torch.randn(32 * len(parts), k, device="cuda", generator=generator) * 0.02
    b = torch.randn(n, 32, device="cuda", generator=generator) * 0.02
    return weight, LoraParts.stacked(a, b, parts, 32, 0.25)


def copy_tb_s() -> float:
    source = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = graph_time_ms(lambda: target.copy_(source), 10)
    return 2 * source.numel() / (ms * 1e-3) / 1e12


def add_shape_arguments(parser: argparse.ArgumentParser, rows: str) -> None:
    """--rows and --projections (this script's and bench/mma_timeline.py's)."""
    parser.add_argument("--rows", default=rows, help=f"row counts, e.g. {rows}")
    parser.add_argument("--projections", default=",".join(PROJECTIONS), help=f"some of {', '.join(PROJECTIONS)}")


def shapes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """The row counts and projections asked for; a mistake is one line and exit 2."""
    try:
        rows_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows must be comma-separated numbers, got {args.rows!r}")
    names = args.projections.split(",")
    if any(name not in PROJECTIONS for name in names):
        parser.error(f"--projections takes some of {', '.join(PROJECTIONS)}, got {args.projections!r}")
    return rows_counts, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="what this copy of the kernel is (served, x_two_groups, ...)")
    add_shape_arguments(parser, "16")
    args = parser.parse_args()
    rows_counts, names = shapes(parser, args)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: run it through the device tool (bench/NOTES.md, Reproduce)")
    bandwidth = copy_tb_s()
    for name in names:
        parts, k, label = PROJECTIONS[name]
        group = [random_projection(parts, k, seed) for seed in range(LAYERS)]
        weight, lora = group[0]
        n = weight.shape[0]
        for rows in rows_counts:
            configs = {c.label: c for c in nf4_kernels.all_configs(rows, n, k, lora.boundaries, lora.rank)}
            if label not in configs:
                print(json.dumps({"what_if": args.label, "projection": name, "rows": rows,
                                  "error": f"no layout {label} at {rows} rows"}), flush=True)
                continue
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")

            def run(config: nf4_kernels.NF4Config = configs[label], x: torch.Tensor = x, layers: list = group) -> list:
                return [nf4_kernels.nf4_lora_linear(x, w, lo, True, config) for w, lo in layers]

            us = graph_time_ms(run, 20) * 1000 / LAYERS
            weight_bytes = weight.nbytes + lora.nbytes
            print(json.dumps({"what_if": args.label, "projection": name, "rows": rows, "layout": label,
                              "us_per_layer": round(us, 2),
                              "weight_bytes_us": round(weight_bytes / (bandwidth * 1e12) * 1e6, 2),
                              "copy_tb_s": round(bandwidth, 2), "device": torch.cuda.get_device_name()}),
                  flush=True)
        group.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
