"""Paged decode attention: microseconds per layer by pages per split (GPU only; prints JSON lines).

Run 28 measured the 16-row decode step's paged attention at 13.9 us a layer (KV 256), ~30 % of the
bandwidth its KV needs, with every (row, KV head) one program that walked its 8 pages one after
another (2 pages per program since). This times `paged_decode_attention` over the Mistral-7B shape (32 query
heads, 8 KV heads, head dim 128, blocks of 32 tokens, a 2,048-token table) for each split size, as
32 calls (one per layer) replayed in a CUDA graph, and reports each split's largest difference from
the served split's output.

    python bench/paged_attention_splits.py [--rows 1,16] [--kv 256,512,1024] [--splits 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK, MAX_SEQ, LAYERS = 32, 8, 128, 32, 2048, 32


def numbers(text: str) -> list[int]:
    """A comma-separated list of positive whole numbers (an argparse type: a bad one is one line)."""
    try:
        values = [int(part) for part in text.split(",") if part]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=numbers, default="1,16")
    parser.add_argument("--kv", type=numbers, default="256,512,1024")
    parser.add_argument("--splits", type=numbers, default="1,2,4,8,16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("paged_attention_splits.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from llm.serving.triton_kernels import PAGES_PER_SPLIT, graph_time_ms, paged_decode_attention

    torch.manual_seed(0)
    device = torch.device("cuda")
    max_blocks = MAX_SEQ // BLOCK
    for rows in args.rows:
        blocks = 1 + rows * max_blocks  # block 0: the scratch block
        k_pool = torch.randn(blocks, KV_HEADS, BLOCK, HEAD_DIM, dtype=torch.bfloat16, device=device)
        v_pool = torch.randn_like(k_pool)
        table = (1 + torch.arange(rows * max_blocks, dtype=torch.int32, device=device)).reshape(rows, max_blocks)
        q = torch.randn(rows, HEADS * HEAD_DIM, dtype=torch.bfloat16, device=device)
        served = PAGES_PER_SPLIT
        for kv in args.kv:
            positions = torch.full((rows,), kv - 1, dtype=torch.long, device=device)
            reference = paged_decode_attention(q, k_pool, v_pool, table, positions, HEAD_DIM**-0.5, HEADS, served)
            for split in args.splits:
                run = functools.partial(paged_decode_attention, q, k_pool, v_pool, table, positions, HEAD_DIM**-0.5,
                                        HEADS, split)
                out = run()
                us_per_layer = graph_time_ms(lambda run=run: [run() for _ in range(LAYERS)], 20) * 1000 / LAYERS
                kv_bytes = 2 * rows * kv * KV_HEADS * HEAD_DIM * 2
                print(json.dumps({
                    "rows": rows, "kv": kv, "pages_per_split": split, "served": split == served,
                    "us_per_layer": round(us_per_layer, 2),
                    "kv_tb_s": round(kv_bytes / (us_per_layer * 1e-6) / 1e12, 2),
                    "max_abs_diff_vs_served": float((out.float() - reference.float()).abs().max()),
                }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
