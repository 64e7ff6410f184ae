"""Paged decode attention: microseconds per layer by pages per split (GPU only; prints JSON lines).

Run 28 measured the 16-row decode step's paged attention at 13.9 us a layer (KV 256), ~30 % of the
bandwidth its KV needs, with every (row, KV head) one program that walked its 8 pages one after
another (2 pages per program since). This times `paged_decode_attention` over the Mistral-7B shape (32 query
heads, 8 KV heads, head dim 128, blocks of 32 tokens, a 2,048-token table) for each split size, as
32 calls (one per layer) replayed in a CUDA graph, and reports each split's largest difference from
the served split's output. With --fused it also times, per rows x kv, the served rotary + KV write +
split attention (`rope_kv_write_paged` + `paged_decode_attention`, three launches) against
`rope_paged_attention`, which does all three in one launch of the same splits (the last split of each
row and KV head to finish combines them), on the same qkv rows.

    python bench/paged_attention_splits.py [--rows 1,16] [--kv 256,512,1024] [--splits 1,2,4,8,16] [--fused]
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
ROPE_THETA = 10000.0


def numbers(text: str) -> list[int]:
    """A comma-separated list of positive whole numbers (an argparse type: a bad one is one line)."""
    try:
        values = [int(part) for part in text.split(",") if part]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def rope_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [MAX_SEQ, HEAD_DIM] in bf16, as MistralDecoder builds them (Mistral-7B's rope_theta)."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.int64).float() / HEAD_DIM))
    angles = torch.arange(MAX_SEQ, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(torch.bfloat16).to(device), emb.sin().to(torch.bfloat16).to(device)


def fused_vs_served(
    k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, kv: int
) -> dict:
    """Microseconds per layer of the served rotary + KV write + split attention and of the one-launch
    kernel on the same random qkv rows (32 calls in a CUDA graph each), and their outputs' difference."""
    from llm.serving.triton_kernels import (
        graph_time_ms,
        paged_decode_attention,
        rope_kv_write_paged,
        rope_paged_attention,
    )

    rows, scale = positions.shape[0], HEAD_DIM**-0.5
    cos, sin = rope_tables(k_pool.device)
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=torch.bfloat16, device=k_pool.device)

    def served() -> torch.Tensor:
        q = rope_kv_write_paged(qkv, cos, sin, positions, table, k_pool, v_pool, HEADS, KV_HEADS, HEAD_DIM)
        return paged_decode_attention(q, k_pool, v_pool, table, positions, scale, HEADS)

    bucket = -(-kv // BLOCK) * BLOCK  # the decoder's KV buckets are whole blocks

    def fused() -> torch.Tensor:
        return rope_paged_attention(qkv, cos, sin, positions, table, k_pool, v_pool, scale, HEADS, KV_HEADS,
                                    HEAD_DIM, bucket)

    served_out, fused_out = served(), fused()  # the same k/v bits go to the same slot either way
    served_us = graph_time_ms(lambda: [served() for _ in range(LAYERS)], 20) * 1000 / LAYERS
    fused_us = graph_time_ms(lambda: [fused() for _ in range(LAYERS)], 20) * 1000 / LAYERS
    return {
        "served_us_per_layer": round(served_us, 2), "fused_us_per_layer": round(fused_us, 2),
        "fused_over_served": round(fused_us / served_us, 3),
        "max_abs_diff": float((fused_out.float() - served_out.float()).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=numbers, default="1,16")
    parser.add_argument("--kv", type=numbers, default="256,512,1024")
    parser.add_argument("--splits", type=numbers, default="1,2,4,8,16")
    parser.add_argument("--fused", action="store_true",
                        help="also time rope_kv_write_paged + paged_decode_attention against rope_paged_attention")
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
            if args.fused:
                print(json.dumps({"rows": rows, "kv": kv, **fused_vs_served(k_pool, v_pool, table, positions, kv)}),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
