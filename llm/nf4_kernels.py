"""Triton kernels for `nf4` mode: bitsandbytes' packed NF4 weights read as they are (CUDA only).

- `dequantize(packed, absmax, code)`: bf16(code[nibble] * absmax) for every value, bit for bit
  `bitsandbytes.functional.dequantize_4bit` (float32 product, one round-to-nearest-even to bf16).
  Prompts multiply such a dequantized chunk with cuBLAS.
- `nf4_lora_linear(x, weight, lora)`: y = x @ dequant(W).T + LoRA for 1..16 rows (a decode step).
  The weight bytes are streamed once: each tile is dequantized in registers (the same bf16 values)
  and multiplied with float32 accumulation - a multiply-reduce for up to 4 rows, `tl.dot` on a
  16-row tile above. The LoRA's `A` product (float32, shared by the fused q/k/v or gate/up parts)
  is one small split-K kernel before; its `B` product, the scaling and PEFT's roundings (base
  output to bf16, LoRA output to bf16, their sum to bf16) are the GEMV's epilogue.
- `NF4Plan`: per (projection, batch bucket), the fastest kernel configuration, timed at start-up
  over all layers' weights.

On the CPU Triton is absent: `available()` is False and `llm.nf4` keeps its PyTorch path.
"""

# Triton kernel arguments are pointers / ints typed by Triton itself, not Python annotations.
# ruff: noqa: ANN001

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llm.nf4 import LoraParts, NF4Matrix

logger = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of PyTorch only.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no Triton path"
    _HAVE_TRITON = False


def available(device: torch.device | str) -> bool:
    return _HAVE_TRITON and torch.device(device).type == "cuda" and torch.cuda.is_available()


@dataclass(frozen=True)
class NF4Config:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    lora_splits: int = 8

    def fits(self, n: int, k: int, boundaries: Sequence[int]) -> bool:
        return k % self.block_k == 0 and n % self.block_n == 0 and all(b % self.block_n == 0 for b in boundaries)


# Few on purpose: each is a Triton compile at start-up.
FMA_CONFIGS = (  # 1-4 rows: multiply-reduce on the CUDA cores (a GEMV needs no tensor cores)
    NF4Config(2, 1024, 4, 1),
    NF4Config(4, 512, 4, 2),
    NF4Config(8, 256, 4, 2),
    NF4Config(4, 1024, 8, 1),
)
DOT_CONFIGS = (  # 5-16 rows: tl.dot on a 16-row tile
    NF4Config(16, 256, 4, 3),
    NF4Config(32, 256, 4, 3),
    NF4Config(64, 128, 4, 3),
)
# Only where nothing above fits (small models, e.g. the tests' tiny one).
SMALL_CONFIGS = (NF4Config(16, 64, 4, 1),)
MAX_ROWS = 16


def _candidates(rows: int, n: int, k: int, boundaries: Sequence[int]) -> list[NF4Config]:
    configs = DOT_CONFIGS if _block_m(rows) == MAX_ROWS else FMA_CONFIGS
    return [c for c in configs if c.fits(n, k, boundaries)] or [c for c in SMALL_CONFIGS if c.fits(n, k, boundaries)]


def supports(n: int, k: int, boundaries: Sequence[int], rank: int) -> bool:
    """Some configuration fits this weight for every row count, and the rank is a power of two."""
    return rank > 0 and rank & (rank - 1) == 0 and all(_candidates(r, n, k, boundaries) for r in (1, MAX_ROWS))


def _block_m(rows: int) -> int:
    return 1 if rows == 1 else 2 if rows == 2 else 4 if rows <= 4 else MAX_ROWS


if _HAVE_TRITON:

    @triton.jit
    def _dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + offs // 32, mask=mask, other=0.0)  # 64 values = 32 bytes per block
        hi = (tl.load(code_ptr + (byte >> 4)) * scale).to(out_ptr.dtype.element_ty)
        lo = (tl.load(code_ptr + (byte & 15)) * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + 2 * offs, hi, mask=mask)
        tl.store(out_ptr + 2 * offs + 1, lo, mask=mask)

    @triton.jit
    def _lora_a_kernel(
        x_ptr, a_ptr, t_ptr, M, K, RT, stride_x, K_PER_SPLIT,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # t[split, m, r] = sum over this split's K range of float32(x[m, k]) * a[r, k]
        pid_r = tl.program_id(0)
        split = tl.program_id(1)
        offs_m = tl.arange(0, 16)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        r_mask = offs_r < RT
        acc = tl.zeros((16, BLOCK_R), dtype=tl.float32)
        k_start = split * K_PER_SPLIT
        for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
            x = tl.load(x_ptr + offs_m[:, None] * stride_x + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
            a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * K + (k0 + offs_k)[None, :], mask=r_mask[:, None],
                        other=0.0)
            acc = tl.dot(x.to(tl.float32), tl.trans(a), acc, input_precision="ieee")
        t_ptrs = t_ptr + split * M * RT + offs_m[:, None] * RT + offs_r[None, :]
        tl.store(t_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])

    @triton.jit
    def _nf4_lora_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, t_ptr, b_ptr, y_ptr,
        M, N, K, stride_x, stride_y, scaling, SEG1, SEG2, RT,
        T_SPLITS: tl.constexpr, RANK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        USE_DOT: tl.constexpr, ROUND_LORA_FIRST: tl.constexpr,
    ):
        HALF: tl.constexpr = BLOCK_K // 2
        SCALES: tl.constexpr = BLOCK_K // 64
        n0 = tl.program_id(0) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_b = tl.arange(0, HALF)
        offs_s = tl.arange(0, SCALES)
        m_mask = offs_m < M
        rows = offs_n.to(tl.int64)
        p_rows = packed_ptr + rows[:, None] * (K // 2)
        s_rows = absmax_ptr + rows[:, None] * (K // 64)
        x_rows = x_ptr + offs_m[:, None] * stride_x
        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc3 = tl.zeros((BLOCK_M, BLOCK_N, HALF), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            byte = tl.load(p_rows + (k0 // 2 + offs_b)[None, :]).to(tl.int32)
            scale = tl.load(s_rows + (k0 // 64 + offs_s)[None, :])
            scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, SCALES, 32)), (BLOCK_N, HALF))
            # The dequantized weights are the bf16 values bitsandbytes would produce.
            w_hi = (tl.load(code_ptr + (byte >> 4)) * scale).to(tl.bfloat16)
            w_lo = (tl.load(code_ptr + (byte & 15)) * scale).to(tl.bfloat16)
            x_even = tl.load(x_rows + (k0 + 2 * offs_b)[None, :], mask=m_mask[:, None], other=0.0)
            x_odd = tl.load(x_rows + (k0 + 2 * offs_b + 1)[None, :], mask=m_mask[:, None], other=0.0)
            if USE_DOT:
                acc = tl.dot(x_even, tl.trans(w_hi), acc)
                acc = tl.dot(x_odd, tl.trans(w_lo), acc)
            else:
                acc3 += x_even.to(tl.float32)[:, None, :] * w_hi.to(tl.float32)[None, :, :]
                acc3 += x_odd.to(tl.float32)[:, None, :] * w_lo.to(tl.float32)[None, :, :]
        if not USE_DOT:
            acc = tl.sum(acc3, axis=2)
        base = acc.to(tl.bfloat16)
        # LoRA epilogue. A tile never straddles two fused parts (BLOCK_N divides their boundaries).
        part = (n0 >= SEG1).to(tl.int32) + (n0 >= SEG2).to(tl.int32)
        offs_r = tl.arange(0, RANK)
        t = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
        for split in range(T_SPLITS):
            t += tl.load(t_ptr + split * M * RT + offs_m[:, None] * RT + part * RANK + offs_r[None, :],
                         mask=m_mask[:, None], other=0.0)
        b = tl.load(b_ptr + rows[:, None] * RANK + offs_r[None, :])
        u = tl.sum(t[:, None, :] * b[None, :, :], axis=2) * scaling
        if ROUND_LORA_FIRST:  # PEFT's bnb layer: LoRA output to bf16, then the bf16 sum
            y = (base.to(tl.float32) + u.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)
        else:  # PEFT's plain Linear: the float32 sum rounded once
            y = (base.to(tl.float32) + u).to(tl.bfloat16)
        tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], y, mask=m_mask[:, None])


def dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    n, half = packed.shape
    out = torch.empty((n, half * 2), dtype=dtype, device=packed.device)
    n_bytes = packed.numel()
    block = 1024
    _dequant_kernel[(triton.cdiv(n_bytes, block),)](packed, absmax, code, out, n_bytes, BLOCK=block)
    return out


class NF4Plan:
    """The configuration per (projection shape, rows bucket), chosen by timing at start-up."""

    def __init__(self) -> None:
        self._choice: dict[tuple[int, int, int], NF4Config] = {}

    def get(self, rows: int, n: int, k: int) -> NF4Config | None:
        return self._choice.get((_block_m(rows), n, k))

    def set(self, rows: int, n: int, k: int, config: NF4Config) -> None:
        self._choice[(_block_m(rows), n, k)] = config

    def summary(self) -> dict[str, str]:
        return {f"m{m}_{n}x{k}": f"{c.block_n}x{c.block_k}w{c.num_warps}s{c.num_stages}"
                for (m, n, k), c in sorted(self._choice.items())}


PLAN = NF4Plan()


def default_config(rows: int, n: int, k: int, boundaries: Sequence[int]) -> NF4Config:
    candidates = _candidates(rows, n, k, boundaries)
    if not candidates:
        raise ValueError(f"no NF4 kernel configuration fits a {n}x{k} weight")
    return candidates[0]


def nf4_lora_linear(
    x: torch.Tensor,
    weight: NF4Matrix,
    lora: LoraParts,
    round_lora_first: bool = True,
    config: NF4Config | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W).T + scaling * B(A(x)) with PEFT's roundings, for 1..16 rows of x."""
    m, k = x.shape
    n = weight.packed.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"the NF4 kernel takes 1..{MAX_ROWS} rows, got {m}")
    boundaries = [start for start, _, _ in lora.segments[1:]]
    config = config or PLAN.get(m, n, k) or default_config(m, n, k, boundaries)
    x = x.contiguous()
    rt = lora.a.shape[0]
    splits = config.lora_splits
    while k % (splits * 64):
        splits //= 2
    t = torch.empty((splits, m, rt), dtype=torch.float32, device=x.device)
    block_r = 32 if rt >= 32 else 16
    _lora_a_kernel[(triton.cdiv(rt, block_r), splits)](
        x, lora.a, t, m, k, rt, x.stride(0), k // splits, BLOCK_R=block_r, BLOCK_K=64, num_warps=4,
    )
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    seg1 = boundaries[0] if len(boundaries) > 0 else n
    seg2 = boundaries[1] if len(boundaries) > 1 else n
    block_m = _block_m(m)
    _nf4_lora_kernel[(n // config.block_n,)](
        x, weight.packed, weight.absmax, weight.code, t, lora.b, y,
        m, n, k, x.stride(0), y.stride(0), lora.scaling, seg1, seg2, rt,
        T_SPLITS=splits, RANK=lora.rank, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        USE_DOT=block_m == MAX_ROWS, ROUND_LORA_FIRST=round_lora_first,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


def tune(projections: dict[str, list], rows_buckets: Sequence[int], repeats: int = 3) -> dict[str, str]:
    """Time every fitting config per (projection, rows bucket) over all layers; keep the fastest."""
    for name, group in projections.items():
        first = group[0]
        n, k = first.weight.shape
        boundaries = [start for start, _, _ in first.lora.segments[1:]]
        for rows in sorted({_block_m(r) for r in rows_buckets}):
            candidates = _candidates(rows, n, k, boundaries)
            if not candidates:
                continue
            x = torch.randn((rows, k), dtype=torch.bfloat16, device=first.weight.packed.device)
            best: tuple[float, NF4Config] | None = None
            for config in candidates:
                try:
                    for p in group[:2]:  # compile + warm
                        nf4_lora_linear(x, p.weight, p.lora, p.round_lora_first, config)
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(repeats):
                        for p in group:
                            nf4_lora_linear(x, p.weight, p.lora, p.round_lora_first, config)
                    end.record()
                    torch.cuda.synchronize()
                    ms = start.elapsed_time(end) / repeats
                except Exception as error:  # noqa: BLE001 - a config that cannot compile here
                    logger.warning("nf4 config %s failed for %s: %r", config, name, error)
                    continue
                if best is None or ms < best[0]:
                    best = (ms, config)
            if best is not None:
                PLAN.set(rows, n, k, best[1])
                logger.info("nf4 %s rows<=%d: %s (%.3f ms over %d layers)", name, rows, best[1], best[0], len(group))
    return PLAN.summary()
