"""Would holding a prompt back, so that prompts share one prefill, help 16 staggered answers? (CPU only)

`nf4` pays ~17 ms per prefill call whatever its length (every weight dequantized for cuBLAS), so two
prompts in one call might save that. This replays `bench_engines.py`'s staggered load (16 prompts of
64-511 tokens from the same generator, one every 20 ms, 256 tokens each) through a model of the
scheduler, with each mode's measured decode steps and prompt times from a results file:

- a prefill call costs `fixed + per_token x rows x length`, over the padded (rows, length) bucket, as
  serving pads it (the buckets and token budget the file's engine reported); the two constants are
  fitted to the file's `prefill_ms` (least squares);
- a decode step costs the file's 1-row or 16-row step, interpolated in log2 of the rows bucket.

Policies: today's (prefill whatever is waiting at each step boundary), and "defer": while others are
decoding, wait until `min_batch` prompts are waiting or the oldest has waited `defer_ms`.
Prints one JSON line per mode and policy: total tok/s, latency p50 / p95, first token p50.

    python bench/prefill_deferral_sim.py bench/results/2026-12-04-nvidia-h200-run28-all.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

def bucket(buckets: list[int], value: int) -> int:
    return next(size for size in buckets if size >= value)


@dataclass
class Costs:
    step_1_ms: float
    step_16_ms: float
    prefill_fixed_ms: float
    prefill_per_token_ms: float
    row_buckets: list[int]
    length_buckets: list[int]
    token_budget: int

    def step_ms(self, rows: int) -> float:
        fraction = math.log2(bucket(self.row_buckets, rows)) / math.log2(self.row_buckets[-1])
        return self.step_1_ms + fraction * (self.step_16_ms - self.step_1_ms)

    def padded_tokens(self, lengths: list[int]) -> int:
        return bucket(self.row_buckets, len(lengths)) * bucket(self.length_buckets, max(lengths))

    def prefill_ms(self, lengths: list[int]) -> float:
        return self.prefill_fixed_ms + self.prefill_per_token_ms * self.padded_tokens(lengths)

    @classmethod
    def from_case(cls, case: dict) -> Costs:
        prefill = case["prefill_ms"]
        points = [(32, prefill["t32"]), (384, prefill["t288"]), (512, prefill["t512"]), (512, prefill["rows4_t128"])]
        tokens = torch.tensor([float(t) for t, _ in points])
        times = torch.tensor([float(ms) for _, ms in points])
        design = torch.stack([torch.ones_like(tokens), tokens], dim=1)
        fixed, per_token = torch.linalg.lstsq(design, times.unsqueeze(1)).solution.flatten().tolist()
        steps, buckets = case["step_profile"], case["engine_info"]["prefill_buckets"]
        return cls(steps["b1_kv256_ms"], steps["b16_kv256_ms"], fixed, per_token, buckets["rows"], buckets["length"],
                   buckets["token_budget"])


def staggered_lengths(n: int = 16, seed: int = 1) -> list[int]:
    """The prompt lengths of `bench_engines.staggered`'s load (its own prompt maker)."""
    from bench_engines import staggered_prompts

    return [len(prompt) for prompt in staggered_prompts(SimpleNamespace(bos_token_id=1), n, seed)]


def simulate(costs: Costs, lengths: list[int], gap_ms: float = 20.0, tokens: int = 256,
             defer_ms: float = 0.0, min_batch: int = 1) -> dict:
    n = len(lengths)
    arrivals = [i * gap_ms for i in range(n)]
    now, arrived = 0.0, 0
    waiting: list[int] = []
    generated: dict[int, int] = {}
    first: dict[int, float] = {}
    finished: dict[int, float] = {}
    while len(finished) < n:
        while arrived < n and arrivals[arrived] <= now:
            waiting.append(arrived)
            arrived += 1
        if waiting and (not generated or len(waiting) >= min_batch or arrived == n
                        or now - arrivals[waiting[0]] >= defer_ms):
            batch = [waiting.pop(0)]
            while waiting and costs.padded_tokens([lengths[i] for i in [*batch, waiting[0]]]) <= costs.token_budget:
                batch.append(waiting.pop(0))
            now += costs.prefill_ms([lengths[i] for i in batch])
            for i in batch:
                generated[i], first[i] = 1, now
            continue
        if generated:
            now += costs.step_ms(len(generated))
            for i in list(generated):
                generated[i] += 1
                if generated[i] >= tokens:
                    finished[i] = now
                    del generated[i]
        else:
            now = max(now, arrivals[arrived])
    latencies = sorted(finished[i] - arrivals[i] for i in range(n))
    return {
        "total_tok_s": round(n * tokens / max(finished.values()) * 1000, 1),
        "latency_p50_s": round(statistics.median(latencies) / 1000, 3),
        "latency_p95_s": round(latencies[min(n - 1, round(0.95 * (n - 1)))] / 1000, 3),
        "ttft_p50_ms": round(statistics.median(first[i] - arrivals[i] for i in range(n)), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a bench_engines.py results file with fast and nf4")
    args = parser.parse_args(argv)
    try:
        cases = {c.get("case"): c for c in json.loads(args.results.read_text()).get("cases", [])}
    except (OSError, ValueError, AttributeError) as error:
        print(f"cannot read {args.results}: {error}", file=sys.stderr)
        return 2
    modes = [mode for mode in ("nf4", "fast") if "prefill_ms" in cases.get(mode, {})
             and "prefill_buckets" in cases[mode].get("engine_info", {})]
    if not modes:
        print(f"{args.results} has no nf4 or fast case with prefill times: not a bench_engines.py results file?",
              file=sys.stderr)
        return 2
    lengths = staggered_lengths()
    for mode in modes:
        costs = Costs.from_case(cases[mode])
        policies = [("today", 0.0, 1)] + [("defer", d, m) for d in (10.0, 20.0, 40.0) for m in (2, 4)]
        for policy, defer_ms, min_batch in policies:
            result = simulate(costs, lengths, defer_ms=defer_ms, min_batch=min_batch)
            print(json.dumps({"mode": mode, "policy": policy, "defer_ms": defer_ms, "min_batch": min_batch,
                              "prefill_fixed_ms": round(costs.prefill_fixed_ms, 2),
                              "prefill_per_token_ms": round(costs.prefill_per_token_ms, 4), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
