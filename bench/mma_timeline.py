"""Where a tensor-core `nf4` launch spends its time, block by block (GPU, device tool).

Run 45's what-ifs (bench/mma_whatifs.py) found about a third of each 16-row launch outside its weight
loop, the same whatever the loop does: ~43 µs a layer on the H100. This splits it. For each projection's
served layout (those of bench/mma_whatifs.py), LAYERS launches of random 7B-shaped layers run one after
another in a CUDA graph with programmatic launch, as the tuner times them, built with stamps
(`nf4_mma.source(..., timeline=True)`): thread 0 of every block records the global timer at

    weight blocks: 0 entry · 1 the kernel before done · 2 x in operand order ready · 3 warp 0's weight
                   loop done · 4 t ready · 5 every warp's sums in shared memory · 6 outputs stored
    LoRA A blocks: 0 entry · 1 the kernel before done · 7 their units done

Prints one JSON line per projection and row count (µs; medians over the middle launches of the chain and
over replays): the launch's span (first block in to last block out), the gap to the next launch's first
block, when the weight blocks enter (first, median, last) and how long their phases take (median block),
when the A blocks finish, and the graph time per launch with and without the stamps; and the served
(unstamped) kernel's registers and blocks per SM, with how many blocks the card runs at once.

    PYTHONPATH=$PWD python3 bench/mma_timeline.py [--rows 16,1] [--replays 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from mma_whatifs import LAYERS, PROJECTIONS, add_shape_arguments, random_projection, shapes  # noqa: E402

from llm.serving import nf4_kernels, nf4_mma  # noqa: E402
from llm.serving.triton_kernels import captured_graph, graph_time_ms  # noqa: E402

WEIGHT_PHASES = {"wait_for_kernel_before": (0, 1), "wait_for_x": (1, 2), "weight_loop": (2, 3), "wait_for_t": (3, 4),
                 "sums_to_shared": (4, 5), "epilogue": (5, 6)}


def launch_summary(stamps: torch.Tensor, la_blocks: int) -> dict:
    """One launch's stamps ([blocks, TIMELINE_SLOTS] int64, ns at slot 2 * point) in µs from its first entry."""
    ns = stamps[:, 0 : 2 * nf4_mma.TIMELINE_POINTS : 2].double()
    start = ns[:, 0].min()
    weights, a_blocks = ns[la_blocks:], ns[:la_blocks]
    out = {"span": (weights[:, 6].max() - start).item() / 1e3}
    entries = (weights[:, 0] - start) / 1e3
    out["weight_block_entry_first_median_last"] = [entries.min().item(), entries.median().item(), entries.max().item()]
    for name, (a, b) in WEIGHT_PHASES.items():
        out[name] = ((weights[:, b] - weights[:, a]) / 1e3).median().item()
    if la_blocks:
        out["a_blocks_done_last"] = ((a_blocks[:, 7] - start).max() / 1e3).item()
        out["a_blocks_done_median"] = ((a_blocks[:, 7] - start) / 1e3).median().item()
    out["first_entry_ns"] = start.item()
    out["last_exit_ns"] = weights[:, 6].max().item()
    return out


def measure(name: str, rows: int, replays: int) -> dict:
    parts, k, label = PROJECTIONS[name]
    group = [random_projection(parts, k, seed) for seed in range(LAYERS)]
    weight, lora = group[0]
    n = weight.shape[0]
    configs = {c.label: c for c in nf4_kernels.all_configs(rows, n, k, lora.boundaries, lora.rank)}
    if label not in configs:
        return {"projection": name, "rows": rows, "error": f"no layout {label} at {rows} rows"}
    warps, tiles, prefetch_x, ahead, fuse_a, shared_lookups, k_splits = nf4_kernels.mma_layout(configs[label])
    rt = lora.a.shape[0]
    la_blocks, weight_blocks = nf4_mma.launch_blocks(rows, n, k, rt, warps, tiles, fuse_a, k_splits)
    blocks = la_blocks + weight_blocks
    stamps = [torch.zeros((blocks, nf4_mma.TIMELINE_SLOTS), dtype=torch.int64, device="cuda") for _ in group]
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    seg1, seg2 = lora.part_starts(n)

    def chain(with_stamps: bool) -> list:
        return [nf4_mma.nf4_mma_linear(x, w, lo, seg1, seg2, True, warps, tiles, prefetch_x, ahead,
                                       inputs=None if fuse_a else nf4_kernels.mma_inputs(x, n, lo),
                                       shared_lookups=shared_lookups, k_splits=k_splits,
                                       timeline=stamp if with_stamps else None)
                for (w, lo), stamp in zip(group, stamps, strict=True)]

    plain_us = graph_time_ms(lambda: chain(False), replays) * 1000 / LAYERS
    stamped_us = graph_time_ms(lambda: chain(True), replays) * 1000 / LAYERS
    graph = captured_graph(lambda: chain(True))
    per_launch: list[dict] = []
    for _ in range(replays):
        graph.replay()
        torch.cuda.synchronize()
        summaries = [launch_summary(s.cpu(), la_blocks) for s in stamps]
        for before, after in zip(summaries, summaries[1:], strict=False):
            before["gap_to_next_launch"] = (after["first_entry_ns"] - before["last_exit_ns"]) / 1e3
        per_launch += summaries[1:-1]  # the middle launches: one before and one after each, as in a step
    keys = [key for key in per_launch[0] if not key.endswith("_ns")]
    registers, per_sm = nf4_mma.occupancy(weight.code, rows, warps, lora.rank, tiles, prefetch_x, ahead, k, fuse_a,
                                          shared_lookups, k_splits)
    slots = per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count
    result: dict = {"projection": name, "rows": rows, "layout": label, "blocks": blocks, "la_blocks": la_blocks,
                    "registers": registers, "blocks_per_sm": per_sm, "blocks_at_once": slots,
                    "graph_us_per_launch": round(plain_us, 2), "graph_us_per_launch_stamped": round(stamped_us, 2)}
    for key in keys:
        values = [summary[key] for summary in per_launch if key in summary]
        if isinstance(values[0], list):
            result[key] = [round(statistics.median(v[i] for v in values), 2) for i in range(len(values[0]))]
        else:
            result[key] = round(statistics.median(values), 2)
    result["device"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, "16,1")
    parser.add_argument("--replays", type=int, default=10)
    args = parser.parse_args()
    rows_counts, names = shapes(parser, args)
    if args.replays < 1:
        parser.error("--replays must be at least 1")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: run it through the device tool (bench/NOTES.md, Reproduce)")
    for name in names:
        for rows in rows_counts:
            print(json.dumps(measure(name, rows, args.replays)), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
