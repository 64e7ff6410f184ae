"""Micro-benchmark of the `nf4` decode kernels on random 7B-shaped weights (GPU, device tool).

For each projection of one Mistral-7B layer (q/k/v, o, gate/up, down) and 1, 4 and 16 rows: time
of the fused kernel (every config), of dequantize + cuBLAS, and of `fast`'s bf16 F.linear, with the
bytes each reads and the achieved TB/s. Prints JSON lines.

    python bench/nf4_kernels.py [ROWS, e.g. 1,4,16]
    python bench/nf4_kernels.py 1,16 --variants   (run 24's served layouts with other shared code pairs)
    python bench/nf4_kernels.py 1,16 --k-splits --projections o,down   (run 24's served layouts, K split across blocks)
    python bench/nf4_kernels.py 1,16 --served   (only the layouts served in runs 24 and 25)
    python bench/nf4_kernels.py 1 --xtab   (the one-row x-table kernel beside the served layouts)
    python bench/nf4_kernels.py --prompts 367,1500   (the prompt path: TF32x3 against PEFT's LoRA products)
    python bench/nf4_kernels.py --profile PROJECTION ROWS CONFIG   (a target for Nsight Compute)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llm.serving import nf4_kernels  # noqa: E402
from llm.serving.nf4 import LoraParts, NF4Matrix, NF4Projection  # noqa: E402
from llm.serving.triton_kernels import graph_time_ms  # noqa: E402

SHAPES = {"qkv": ([4096, 1024, 1024], 4096), "o": ([4096], 4096), "gate_up": ([14336, 14336], 4096),
          "down": ([4096], 14336)}
LAYERS = 8  # distinct copies, so the L2 cache does not hold the weights between calls


def timed(function, repeats: int = 10) -> float:  # noqa: ANN001
    """Microseconds per call of all LAYERS, replayed from a CUDA graph as serving runs it (no launch
    overhead: Python's launch cost would otherwise dominate these microsecond kernels)."""
    return graph_time_ms(function, repeats) * 1000


def projection(parts: list[int], cols: int, seed: int) -> NF4Projection:
    import bitsandbytes as bnb

    matrices = []
    for i, rows in enumerate(parts):
        torch.manual_seed(seed * 10 + i)
        weight = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda") * 0.02
        param = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4")
        matrices.append(NF4Matrix.from_bnb(param.to("cuda")))
    a = torch.randn(32 * len(parts), cols, device="cuda") * 0.02
    b = torch.randn(sum(parts), 32, device="cuda") * 0.02
    return NF4Projection(NF4Matrix.concat(matrices), LoraParts.stacked(a, b, parts, 32, 0.25))


# The tensor-core layouts the tuner served in runs 24 and 25 (1 to 16 rows)
SERVED_LAYOUTS = {"mma_16x256w16s1f", "mma_32x256w8s1ft3", "mma_32x256w4s1pft2", "mma_16x256w8s1ft2", "mma_16x256w8s2f",
                  "mma_16x256w4s2ft2", "mma_32x256w4s1pft3", "mma_32x256w4s1pf", "mma_32x256w8s1pft2k2",
                  "mma_16x256w16s1", "mma_32x256w4s1ft2", "mma_16x256w8s1f", "mma_16x256w8s1ft1", "mma_16x256w4s2f"}


def served_and_variants(configs: list[nf4_kernels.NF4Config],
                        variants_of: Callable[[nf4_kernels.NF4Config], list[nf4_kernels.NF4Config]],
                        ) -> list[nf4_kernels.NF4Config]:
    """The served tensor-core layouts (runs 24 and 25) as they are and their variants (only those:
    every layout's variants would be hundreds of compiles)."""
    served = [c for c in configs if c.label in SERVED_LAYOUTS]
    found = served + [v for c in served for v in variants_of(c)]
    return list({c.label: c for c in found}.values())


def measure(name: str, parts: list[int], cols: int, rows_counts: Sequence[int], only: str | None = None) -> None:
    """Time `name`'s layouts at each row count: all of them, or `only` the served ones ("served"),
    with their shared-code-pair variants ("variants") or with their K splits ("k-splits")."""
    group = [projection(parts, cols, seed) for seed in range(LAYERS)]
    dense = [torch.randn(sum(parts), cols, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
    n, k = group[0].weight.shape
    nf4_bytes = group[0].weight.nbytes + group[0].lora.nbytes
    boundaries, rank = group[0].lora.boundaries, group[0].lora.rank
    for rows in rows_counts:
        x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
        result: dict = {"projection": name, "rows": rows, "nf4_mb": round(nf4_bytes / 1e6, 1),
                        "bf16_mb": round(n * k * 2 / 1e6, 1)}

        def fused(config: nf4_kernels.NF4Config, x: torch.Tensor = x) -> list:
            return [nf4_kernels.nf4_lora_linear(x, p.weight, p.lora, True, config) for p in group]

        reference = group[0].reference(x)
        wrong = []
        configs = nf4_kernels.all_configs(rows, n, k, boundaries, rank)
        if only == "variants":  # shared code pairs for other numbers of absmax blocks
            configs = served_and_variants(configs, lambda c, rows=rows: nf4_kernels.variants(c, rows, rank))
        elif only == "k-splits":
            configs = served_and_variants(
                configs, lambda c, rows=rows: nf4_kernels.k_split_variants(c, n, k, boundaries, rows, rank))
        elif only == "served":
            configs = served_and_variants(configs, lambda c: [])
        elif only == "xtab":
            configs = [c for c in configs if c.kind == "xtab"] + served_and_variants(configs, lambda c: [])
        for config in configs:
            if not nf4_kernels.matches_reference(fused(config)[0], reference):
                wrong.append(config.label)
            us = timed(lambda c=config: fused(c)) / LAYERS
            result[f"fused_{config.label}_us"] = round(us, 1)
        result["configs_disagreeing_with_reference"] = wrong
        # the LoRA A kernel as the tensor-core configurations run it (it also writes x in their order)
        result["lora_a_only_us"] = round(timed(lambda x=x: [nf4_kernels.mma_inputs(x, n, p.lora)
                                                              for p in group]) / LAYERS, 1)
        result["dequant_cublas_us"] = round(timed(lambda x=x: [p.prompt(x) for p in group]) / LAYERS, 1)
        result["bf16_cublas_us"] = round(timed(lambda x=x: [F.linear(x, w) for w in dense]) / LAYERS, 1)
        best = min(v for key, v in result.items() if key.startswith("fused_"))
        result["best_fused_tb_s"] = round(nf4_bytes / (best * 1e-6) / 1e12, 2)
        result["bf16_tb_s"] = round(n * k * 2 / (result["bf16_cublas_us"] * 1e-6) / 1e12, 2)
        print(json.dumps(result), flush=True)


def measure_prompts(name: str, parts: list[int], cols: int, rows_counts: Sequence[int]) -> None:
    """A prompt's rows through the prompt path, with the tensor cores' TF32x3 LoRA products and with
    PEFT's own float32 ones (what `nf4` serves up to `EXACT_PROMPT_ROWS` since run 20): time per call, the
    scratch memory each needs, and how many outputs differ from the reference path (the seed's function)."""
    group = [projection(parts, cols, seed) for seed in range(LAYERS)]
    for rows in rows_counts:
        x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
        reference = group[0].reference(x)
        result: dict = {"projection": name, "prompt_rows": rows}
        for label, pefts in (("tf32x3", False), ("pefts", True)):
            def run(p: NF4Projection, x: torch.Tensor = x, pefts: bool = pefts) -> torch.Tensor:
                return nf4_kernels.nf4_prompt_linear(x, p.weight, p.lora, p.round_lora_first, pefts_products=pefts)

            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = run(group[0])
            torch.cuda.synchronize()
            result[f"{label}_scratch_mb"] = round((torch.cuda.max_memory_allocated() - before) / 1e6, 1)
            result[f"{label}_differing_outputs"] = int((out.view(torch.int16) != reference.view(torch.int16)).sum())
            del out
            result[f"{label}_us"] = round(timed(lambda run=run: [run(p) for p in group]) / LAYERS, 1)
        result["pefts_over_tf32x3"] = round(result["pefts_us"] / result["tf32x3_us"], 3)
        print(json.dumps(result), flush=True)


def profile_target(name: str, rows: int, label: str) -> None:
    """A few eager calls of one kernel configuration on one projection, for Nsight Compute:
    `ncu --kernel-name regex:nf4 --launch-skip 4 --launch-count 1 python bench/nf4_kernels.py
    --profile gate_up 1 lut_8x4096w4s1`."""
    parts, cols = SHAPES[name]
    target = projection(parts, cols, seed=0)
    n, k = target.weight.shape
    configs = {c.label: c for c in nf4_kernels.all_configs(rows, n, k, target.lora.boundaries, target.lora.rank)}
    if label not in configs:
        raise SystemExit(f"no configuration {label!r} for {name} at {rows} rows; there are: {', '.join(configs)}")
    x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
    for _ in range(4):
        nf4_kernels.nf4_lora_linear(x, target.weight, target.lora, True, configs[label])
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", default="1,4,16", help="row counts to time, e.g. 1,4,16")
    parser.add_argument("--prompts", action="store_true",
                        help="time the prompt path's two LoRA product kinds instead (rows: prompt lengths)")
    parser.add_argument("--variants", action="store_true",
                        help="time run 24's served tensor-core layouts with other numbers of shared code pairs")
    parser.add_argument("--k-splits", action="store_true",
                        help="time run 24's served tensor-core layouts with K split across 2-8 blocks per feature tile")
    parser.add_argument("--served", action="store_true",
                        help="time only the tensor-core layouts served in runs 24 and 25")
    parser.add_argument("--xtab", action="store_true",
                        help="time the one-row x-table kernel beside the tensor-core layouts served in runs 24 and 25")
    parser.add_argument("--projections", default=",".join(SHAPES),
                        help=f"which projections to time, e.g. o,down (of {', '.join(SHAPES)})")
    parser.add_argument("--profile", nargs=3, metavar=("PROJECTION", "ROWS", "CONFIG"),
                        help=f"only run one configuration (an Nsight Compute target); projections: {', '.join(SHAPES)}")
    args = parser.parse_args()
    # the arguments first, so that a mistake is named before a missing GPU is
    if args.profile and (args.profile[0] not in SHAPES or not args.profile[1].isdigit()):
        parser.error(f"--profile takes one of {', '.join(SHAPES)}, a row count and a configuration label")
    try:
        rows_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error(f"rows must be comma-separated numbers, got {args.rows!r}")
    chosen = [flag for flag, on in (("variants", args.variants), ("k-splits", args.k_splits),
                                    ("served", args.served), ("xtab", args.xtab)) if on]
    if chosen and args.prompts:
        parser.error("--variants, --k-splits, --served and --xtab time the decode kernels: not with --prompts")
    if len(chosen) > 1:
        parser.error("--variants, --k-splits, --served or --xtab, one at a time")
    names = args.projections.split(",")
    if not names or any(name not in SHAPES for name in names):
        parser.error(f"--projections takes some of {', '.join(SHAPES)}, got {args.projections!r}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: run it through the device tool (bench/NOTES.md, Reproduce)")
    if args.profile:
        name, rows, label = args.profile
        profile_target(name, int(rows), label)
        return
    for name in names:
        parts, cols = SHAPES[name]
        if args.prompts:
            measure_prompts(name, parts, cols, rows_counts)
        else:
            measure(name, parts, cols, rows_counts, chosen[0] if chosen else None)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
