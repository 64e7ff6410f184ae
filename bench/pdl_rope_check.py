"""Does the served rotary kernel, launched programmatically, ever read the projection before it is written?
Repeats tests/gpu/test_programmatic_launch.py's rotary case many times and classifies each mismatch:
what the served q row equals instead (zeros read, another position's rotation, the unrotated input). The
same with the rotary kernel launched plainly after the slow writer, and after a synchronize, separates a
race in the rotary kernel from one in the test's writer. Prints JSON. GPU only:

    python bench/pdl_rope_check.py [REPEATS]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.serving import programmatic_launch, triton_kernels  # noqa: E402
from tests.gpu.slow_writer import written_slowly  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repeats", nargs="?", type=int, default=200, help="repeats of each way (default 200)")
    repeats = parser.parse_args().repeats
    if not torch.cuda.is_available():
        print("pdl_rope_check.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    qkv = torch.randn(2, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    positions = torch.tensor([5, 40], device="cuda")
    table = torch.arange(1, 9, dtype=torch.int32, device="cuda").view(2, 4)
    angles = torch.outer(torch.arange(64, device="cuda").float(), torch.rand(HEAD_DIM // 2, device="cuda"))
    angles = torch.cat((angles, angles), dim=-1)  # [position, HEAD_DIM], as the decoder's tables
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()

    def rotate(source: torch.Tensor, where: torch.Tensor = positions) -> torch.Tensor:
        k_pool = torch.zeros(9, KV_HEADS, BLOCK_SIZE, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        return triton_kernels.rope_kv_write_paged(source, cos, sin, where, table, k_pool, torch.zeros_like(k_pool),
                                                  HEADS, KV_HEADS, HEAD_DIM)

    with programmatic_launch.serial_launches():
        expected = rotate(qkv).clone()
        candidates = {"zeros read": rotate(torch.zeros_like(qkv)).clone(), "unrotated": qkv[:, : HEADS * HEAD_DIM].clone()}
        for position in range(64):
            candidates[f"position {position}"] = rotate(qkv, torch.full((2,), position, device="cuda")).clone()

    def classify(row: int, got: torch.Tensor) -> str:
        for name, tensor in candidates.items():
            if torch.equal(got[row], tensor[row]):
                return name
        same = (got[row] == expected[row]).float().mean().item()
        return f"other ({same:.2f} of values right)"

    results = {}
    for way in ("programmatic", "plain after the writer", "after a synchronize"):
        mismatches: Counter[str] = Counter()
        for _ in range(repeats):
            source = written_slowly(qkv)
            if way == "after a synchronize":
                torch.cuda.synchronize()
            if way == "programmatic":
                got = rotate(source)
            else:
                with programmatic_launch.serial_launches():
                    got = rotate(source)
            torch.cuda.synchronize()
            for row in range(2):
                if not torch.equal(got[row], expected[row]):
                    mismatches[f"row {row}: {classify(row, got)}"] += 1
        results[way] = {"repeats": repeats, "mismatched_rows": dict(mismatches)}
        print(json.dumps({"way": way, **results[way]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
