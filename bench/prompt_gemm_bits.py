"""Whether a Triton `tl.dot` GEMM gives cuBLAS's bits for `nf4`'s exact prompt products (GPU, no weights).

`nf4`'s prompts are the seed's function bit for bit because every weight is dequantized into a bf16
scratch and multiplied by cuBLAS, as bitsandbytes does for many rows (run 20). That dequantization
writes and reads 14.5 GB a prompt (~5 ms on the H200), which a kernel dequantizing its tiles on the
fly would not; but only if its products carry cuBLAS's bits. They can: both run the same tensor-core
instruction over k in the same order, unless cuBLAS splits K. This script asks, for the prompt shapes
(rows: the prefill buckets; the projections' N and K), which cuBLAS kernel F.linear runs and how many
outputs of a plain Triton GEMM (acc = tl.dot(x, w.T, acc) over K tiles, float32 accumulator, bf16
out) differ from its bits, for a few tile shapes. One JSON line per shape and tile:

    python3 bench/prompt_gemm_bits.py [--rows 32,64,128,384,512] [--quick] [--splits]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llm.serving.nf4_kernels import base_split_candidates  # noqa: E402

SHAPES = {"q_o": (4096, 4096), "k_v": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336),
          "qkv_chunk": (2048, 4096)}
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
TILES = [(64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 32, 4, 4), (64, 64, 128, 4, 3),
         (128, 256, 64, 8, 3), (64, 64, 16, 4, 4)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,64,128,384,512")
    parser.add_argument("--quick", action="store_true", help="the first two tiles only")
    parser.add_argument("--splits", action="store_true",
                        help="where cuBLAS splits K: which split (2-16 parts) and order of adding them gives its bits")
    args = parser.parse_args()
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows takes comma-separated row counts, e.g. 32,384; got {args.rows!r}")
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a GPU"}))
        return 2
    import triton
    import triton.language as tl

    @triton.jit
    def gemm(x_ptr, w_ptr, out_ptr, M, N, K, K_PER_SPLIT, BLOCK_M: tl.constexpr,  # noqa: ANN001
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_OUT: tl.constexpr):
        # x @ w.T over K range program_id(2) * K_PER_SPLIT ...: float32 partial products (SPLIT_OUT), or
        # with one split, the bf16 product
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(split * K_PER_SPLIT, tl.minimum(split * K_PER_SPLIT + K_PER_SPLIT, K), BLOCK_K):
            x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
            w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=rn[:, None] < N, other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if SPLIT_OUT:
            tl.store(out_ptr + split * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)
        else:
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16), mask=mask)

    def split_k(x: torch.Tensor, w: torch.Tensor, splits: int, k_per_split: int) -> torch.Tensor:
        rows, k = x.shape
        n = w.shape[0]
        partials = torch.empty((splits, rows, n), dtype=torch.float32, device=x.device)
        gemm[(triton.cdiv(rows, 64), triton.cdiv(n, 64), splits)](
            x, w, partials, rows, n, k, k_per_split, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_OUT=True, num_warps=4,
            num_stages=3)
        return partials

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    tiles = TILES[:2] if args.quick else TILES
    for rows in row_counts:
        for name, (n, k) in SHAPES.items():
            x = (torch.randn((rows, k), generator=g, device=device) * 0.5).to(torch.bfloat16)
            w = (torch.randn((n, k), generator=g, device=device) * 0.02).to(torch.bfloat16)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                reference = torch.nn.functional.linear(x, w)
                torch.cuda.synchronize()
            kernels = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
            if args.splits and any("splitK" in name for name in kernels):
                # which split of K (the fused prompt base's candidates), and which order of adding the
                # partials, gives cuBLAS's bits
                for splits, k_per_split in base_split_candidates(k)[1:]:
                    partials = split_k(x, w, splits, k_per_split)
                    in_order = partials[0].clone()
                    for s in range(1, splits):
                        in_order += partials[s]
                    reverse = partials[-1].clone()
                    for s in range(splits - 2, -1, -1):
                        reverse += partials[s]
                    for order, total in (("in_order", in_order), ("reverse", reverse), ("torch_sum", partials.sum(0))):
                        differ = (total.to(torch.bfloat16) != reference).sum().item()
                        if differ * 20 < reference.numel():
                            print(json.dumps({"rows": rows, "projection": name, "n": n, "k": k, "splits": splits,
                                              "k_per_split": k_per_split, "order": order, "differ": differ,
                                              "outputs": reference.numel()}), flush=True)
                continue
            for block_m, block_n, block_k, warps, stages in tiles:
                y = torch.empty_like(reference)
                grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n), 1)
                gemm[grid](x, w, y, rows, n, k, k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_OUT=False,
                           num_warps=warps, num_stages=stages)
                torch.cuda.synchronize()
                differ = (y != reference).sum().item()
                close = torch.allclose(y.float(), reference.float(), rtol=2e-2, atol=1e-2)
                print(json.dumps({"rows": rows, "projection": name, "n": n, "k": k, "cublas": kernels,
                                  "tile": f"{block_m}x{block_n}x{block_k}w{warps}s{stages}", "outputs": y.numel(),
                                  "differ": differ, "close": close}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
