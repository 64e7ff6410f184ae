"""Where the one-row x-table launches spend their time, block by block (GPU, device tool).

Chains one Mistral-7B layer's three x-table launches as the one-row decode step runs them (q/k/v
after the residual add and RMSNorm, gate/up after the same, down after `silu(gate) * up`) over
`--layers` random 7B-shaped layers, in a CUDA graph with programmatic launch. The same chain built
with stamps (`nf4_xtab.source(..., timeline=True)`) records, for every block of every launch, the
global timer and its SM's cycle counter at nine points (warp 0's view where no barrier precedes):

    0 entry · 1 the kernel before is done (x readable) · 2 x prepared (the add and norm, or silu x up) ·
    3 its table entries written · 4 its LoRA A rank summed · 5 the block's table complete ·
    6 every warp's weight sums stored · 7 the grid-wide barrier passed · 8 the block's rows finished

Prints, for each layout (`nf4_xtab.XtabLayout`: warps per block x row groups of weights in flight per
warp: `16x1`, `8x1`, `8x2`), one JSON line per projection (microseconds; medians over layers and replays of
each launch's median and slowest block, and how long an SM sits between one launch's block leaving and the
next one's arriving) and one for the chain: its graph time with and without the stamps. (Runs 36-38's
staged, L2-prefetching and flag-linked variants were timed here in run 39, slower, and retired: see
bench/NOTES.md.)

    python3 bench/xtab_timeline.py [--layers 4] [--replays 20] [--layouts 16x1,8x2]
    (by default: the layouts the tuner times, `nf4_xtab.SERVED_LAYOUTS`)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from llm.serving import nf4_mma, nf4_xtab  # noqa: E402
from llm.serving.nf4 import NF4Projection  # noqa: E402
from llm.serving.triton_kernels import captured_graph, graph_time_ms  # noqa: E402

POINTS = ("entry", "x_ready", "x_prepared", "table_written", "lora_a_summed", "tabulated", "sums_stored",
          "barrier_passed", "done")
PHASES = ("wait", "prepare_x", "table", "lora_a", "table_sync", "weights", "barrier", "finish")
NS = slice(0, 2 * len(POINTS), 2)  # a block's stamps: (ns, cycles) per point, its SM in the last slot
CYCLES = slice(1, 2 * len(POINTS), 2)
DONE, SUMS_STORED = POINTS.index("done"), POINTS.index("sums_stored")
assert len(POINTS) == nf4_xtab.TIMELINE_POINTS, "the kernel's STAMP points and these names differ"
DEFAULT_LAYOUTS = ",".join(layout.label for layout in nf4_xtab.SERVED_LAYOUTS)
HIDDEN, INTERMEDIATE, KV = 4096, 14336, 1024
BANDWIDTH_BYTES_PER_US = 4.2e6  # the H200's measured copy rate, for the bytes-only time


def bytes_read(projection: NF4Projection) -> int:
    weight, lora = projection.weight, projection.lora
    return (weight.packed.numel() * weight.packed.element_size() + weight.absmax.numel() * 4
            + lora.a.numel() * 4 + lora.b.numel() * 4)


class Chain:
    """`layers` x (q/k/v, gate/up, down) x-table launches, each with its own stamp buffer."""

    def __init__(self, layers: int) -> None:
        from nf4_kernels import projection  # bench/nf4_kernels.py: random NF4 + LoRA of the seed's shape

        self.layout = nf4_xtab.XtabLayout()
        self.layers = [
            {"qkv": projection([HIDDEN, KV, KV], HIDDEN, 100 + layer),
             "gate_up": projection([INTERMEDIATE, INTERMEDIATE], HIDDEN, 200 + layer),
             "down": projection([HIDDEN], INTERMEDIATE, 300 + layer)}
            for layer in range(layers)]
        device = torch.device("cuda")
        self.sms = nf4_xtab.sm_count(device)
        self.code = nf4_mma.code_values(self.layers[0]["qkv"].weight.code)
        torch.manual_seed(0)
        self.residual = torch.randn(1, HIDDEN, dtype=torch.bfloat16, device=device)
        self.delta = torch.randn(1, HIDDEN, dtype=torch.bfloat16, device=device) * 0.1
        self.norm = torch.ones(HIDDEN, dtype=torch.bfloat16, device=device)
        self.stamps = [
            {name: torch.zeros(self.blocks(p), nf4_xtab.TIMELINE_SLOTS, dtype=torch.int64, device=device)
             for name, p in layer.items()}
            for layer in self.layers]

    def chunks(self, projection: NF4Projection) -> int:
        return nf4_xtab.chunks_for(*projection.weight.shape, self.sms)

    def blocks(self, projection: NF4Projection) -> int:
        return projection.weight.shape[1] // nf4_xtab.SLICE * self.chunks(projection)

    def run(self, stamped: bool) -> torch.Tensor:
        """The chain's last output (down's, of the last layer)."""
        residual, delta = self.residual, self.delta
        for layer, stamps in zip(self.layers, self.stamps, strict=True):
            qkv, gate_up, down = layer["qkv"], layer["gate_up"], layer["down"]
            residual, q = nf4_xtab.nf4_xtab_after_add_norm(
                residual, delta, self.norm, 1e-5, qkv.weight, qkv.lora, *qkv.lora.part_starts(qkv.weight.shape[0]),
                True, self.layout, self.code, timeline=stamps["qkv"] if stamped else None)
            # attention and o are not in the chain: q's first 4096 values stand in for o's output
            residual, gu = nf4_xtab.nf4_xtab_after_add_norm(
                residual, q[:, :HIDDEN], self.norm, 1e-5, gate_up.weight, gate_up.lora,
                *gate_up.lora.part_starts(gate_up.weight.shape[0]), True, self.layout, self.code,
                timeline=stamps["gate_up"] if stamped else None)
            delta = nf4_xtab.nf4_xtab_after_silu_mul(
                gu, down.weight, down.lora, *down.lora.part_starts(down.weight.shape[0]), True, self.layout,
                self.code, timeline=stamps["down"] if stamped else None)
        return delta


def launch_records(chain: Chain) -> list[tuple[str, torch.Tensor]]:
    """(projection, stamps [blocks, slots] on the CPU) of every launch, in launch order."""
    return [(name, stamps[name].cpu()) for stamps in chain.stamps for name in ("qkv", "gate_up", "down")]


def cycles_per_ns(records: list[tuple[str, torch.Tensor]]) -> float:
    """The SMs' clock: per SM, its first entry to its last finish in this replay, cycles over ns."""
    first: dict[int, tuple[int, int]] = {}
    last: dict[int, tuple[int, int]] = {}
    for _, stamps in records:
        for block in stamps.tolist():
            sm = block[-1]
            entry, finish = (block[0], block[1]), (block[2 * DONE], block[2 * DONE + 1])
            if sm not in first or entry[0] < first[sm][0]:
                first[sm] = entry
            if sm not in last or finish[0] > last[sm][0]:
                last[sm] = finish
    ratios = [(last[sm][1] - first[sm][1]) / (last[sm][0] - first[sm][0])
              for sm in first if last[sm][0] > first[sm][0]]
    return statistics.median(ratios)


def summarize_replay(records: list[tuple[str, torch.Tensor]]) -> list[dict]:
    """Per launch: each phase's median and slowest block (us, from the SM's cycles), the launch's span
    and its start against the launch before (us, global timer), and the same-SM gaps before it."""
    clock = cycles_per_ns(records)
    out = []
    previous: torch.Tensor | None = None
    for name, stamps in records:
        ns = stamps[:, NS].double()
        cycles = stamps[:, CYCLES].double()
        phase_us = (cycles[:, 1:] - cycles[:, :-1]) / clock / 1000
        row = {"projection": name, "blocks": stamps.shape[0],
               "span_us": (ns[:, DONE].max() - ns[:, 0].min()).item() / 1000}
        for i, phase in enumerate(PHASES):
            row[f"{phase}_median_us"] = phase_us[:, i].median().item()
            row[f"{phase}_max_us"] = phase_us[:, i].max().item()
        row["sums_stored_spread_us"] = (ns[:, SUMS_STORED].max() - ns[:, SUMS_STORED].min()).item() / 1000
        if previous is not None:
            previous_end = previous[:, NS].double()[:, DONE].max()
            row["first_entry_after_previous_end_us"] = (ns[:, 0].min() - previous_end).item() / 1000
            row["median_entry_after_previous_end_us"] = (ns[:, 0].median() - previous_end).item() / 1000
            row["median_x_ready_after_previous_end_us"] = (ns[:, 1].median() - previous_end).item() / 1000
            ends = {int(block[-1]): block[2 * DONE + 1] for block in previous.tolist()}
            gaps = [(block[1] - ends[int(block[-1])]) / clock / 1000 for block in stamps.tolist()
                    if int(block[-1]) in ends]
            if gaps:
                row["same_sm_gap_median_us"] = statistics.median(gaps)
                row["same_sm_gap_max_us"] = max(gaps)
        out.append(row)
        previous = stamps
    return out


def measure_layout(chain: Chain, layout: nf4_xtab.XtabLayout, replays: int, outputs: dict[int, torch.Tensor]) -> None:
    """Print the layout's lines; `outputs`: the chain's output per warp count, from the first layout
    measured with it (other groups in flight must give the same bits: the same sums in the same order)."""
    chain.layout = layout
    output = chain.run(False).clone()
    same_bits = bool(torch.equal(output, outputs.setdefault(layout.warps, output)))
    described = {"layout": layout.label, "warps": layout.warps, "ahead": layout.ahead}
    plain_ms = graph_time_ms(lambda: chain.run(False), 20)
    stamped_ms = graph_time_ms(lambda: chain.run(True), 20)
    graph = captured_graph(lambda: chain.run(True))
    for _ in range(3):
        graph.replay()
    rows: list[list[dict]] = []
    for _ in range(replays):
        graph.replay()
        torch.cuda.synchronize()
        rows.append(summarize_replay(launch_records(chain)))
    clock_ghz = cycles_per_ns(launch_records(chain))
    del graph

    per_launch = list(zip(*rows, strict=True))  # launch index -> its row in every replay
    for name in ("qkv", "gate_up", "down"):
        launches = [replays for replays in per_launch if replays[0]["projection"] == name]
        keys = [k for k in launches[-1][0] if k not in ("projection", "blocks")]
        summary = {"projection": name, "blocks": launches[0][0]["blocks"], **described,
                   "bytes_only_us": round(bytes_read(chain.layers[0][name]) / BANDWIDTH_BYTES_PER_US, 2)}
        for key in keys:
            values = [row[key] for replays in launches for row in replays if key in row]
            if values:
                summary[key] = round(statistics.median(values), 2)
        print(json.dumps(summary), flush=True)
    launches_per_replay = 3 * len(chain.layers)
    print(json.dumps({
        "chain": f"{len(chain.layers)} layers x (qkv, gate_up, down)", **described,
        "device": torch.cuda.get_device_name(), "sm_clock_ghz": round(clock_ghz, 3),
        "graph_ms_plain": round(plain_ms, 4), "graph_ms_stamped": round(stamped_ms, 4),
        "us_per_launch_plain": round(plain_ms * 1000 / launches_per_replay, 2), "replays": replays,
        "same_bits_as_first_layout_with_these_warps": same_bits}), flush=True)


def layouts(text: str) -> list[nf4_xtab.XtabLayout]:
    """The layouts comma-separated in `text`; exits with one line on a bad one."""
    try:
        return [nf4_xtab.XtabLayout.parse(label) for label in text.split(",")]
    except ValueError as error:
        sys.exit(f"xtab_timeline: bad --layouts: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="random layers chained (default 4: past the L2)")
    parser.add_argument("--replays", type=int, default=20, help="stamped replays summarized (default 20)")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                        help="WARPSxAHEAD, comma-separated: warps per block x row groups in flight "
                             f"(default: the served {DEFAULT_LAYOUTS})")
    args = parser.parse_args()
    chosen = layouts(args.layouts)
    if not torch.cuda.is_available() or not nf4_xtab.available("cuda"):
        sys.exit("xtab_timeline: needs a CUDA GPU where the x-table kernel compiles (run it on the device)")
    if args.layers < 1 or args.replays < 1:
        sys.exit("xtab_timeline: --layers and --replays must be at least 1")

    chain = Chain(args.layers)
    # every kernel the layouts launch, plain and stamped, compiled on all cores first (one at a time: minutes)
    device = torch.device("cuda")
    requests = [(chain.code, device, projection.weight.shape[1], projection.lora.rank, chain.chunks(projection),
                 prep, layout, stamped)
                for layout in chosen
                for projection, prep in ((chain.layers[0]["qkv"], nf4_xtab.ADD_NORM),
                                         (chain.layers[0]["gate_up"], nf4_xtab.ADD_NORM),
                                         (chain.layers[0]["down"], nf4_xtab.SILU_MUL))
                for stamped in (False, True)]
    nf4_xtab.precompile(requests, threads=os.cpu_count() or 1)
    outputs: dict[int, torch.Tensor] = {}
    for layout in chosen:
        measure_layout(chain, layout, args.replays, outputs)


if __name__ == "__main__":
    main()
