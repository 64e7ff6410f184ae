"""The element-wise steps before a 2-16-row `nf4` tensor-core launch, each writing its output twice:
as it is (the residual stream and the launch's LoRA `A` blocks read it so) and in the tensor-core
kernel's operand order (`llm.serving.nf4_mma.operand_order`). The fused launch after it then starts
its weight loop at once: before, every weight block waited for the launch's own A blocks to copy x
into that order (load x, store it, fence, count), on the 16-row step's critical path four times a
layer (run 43: the small projections' launches at 16 rows took 6-7 x their weights' bytes).

Each computes what eager PyTorch computes, op by op, every op rounded to bf16 as there:
- the residual add and MistralRMSNorm (q/k/v's and gate/up's input), the sum of squares in one
  fixed order (Inductor's and eager's orders differ from it and from each other: at most a rounding
  step of the normalized value, rarely);
- `silu(gate) * up` (down's input), silu as F.silu's CUDA kernel computes it: x / (1 + exp(-x)) in
  float32, accurate `expf`, IEEE division.
Triton's interpreter (the CPU tests) has no libdevice and truncates where the GPU rounds to nearest:
there the values are a rounding step off, the operand order is the same.
"""

# Triton kernel arguments are pointers / ints typed by Triton itself, not Python annotations.
# ruff: noqa: ANN001

from __future__ import annotations

import os

import torch

from llm.serving.triton_kernels import (
    _HAVE_TRITON,
    after_previous_kernels,
    operand_order_offsets,
    programmatic_options,
)

# The interpreter runs these kernels on the CPU with numpy: no libdevice there (numpy's exp is accurate)
_LIBDEVICE = os.environ.get("TRITON_INTERPRET", "0") != "1"

if _HAVE_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _add_norm_kernel(h_ptr, delta_ptr, weight_ptr, h_out_ptr, x_ptr, xq_ptr, eps, ld_h, ld_delta,
                         K: tl.constexpr, LIBDEVICE: tl.constexpr, GDC: tl.constexpr):
        row = tl.program_id(0)
        after_previous_kernels(GDC)
        k = tl.arange(0, K)
        h = tl.load(h_ptr + row * ld_h + k).to(tl.float32)
        delta = tl.load(delta_ptr + row * ld_delta + k).to(tl.float32)
        summed = (h + delta).to(tl.bfloat16)
        tl.store(h_out_ptr + row * K + k, summed)
        xf = summed.to(tl.float32)
        mean_square = tl.sum(xf * xf, 0) / K
        scale = libdevice.rsqrt(mean_square + eps) if LIBDEVICE else tl.math.rsqrt(mean_square + eps)
        normed = (xf * scale).to(tl.bfloat16).to(tl.float32)
        x = (tl.load(weight_ptr + k).to(tl.float32) * normed).to(tl.bfloat16)
        tl.store(x_ptr + row * K + k, x)
        tl.store(xq_ptr + operand_order_offsets(row, k), x)

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, x_ptr, xq_ptr, ld_gate_up, INTER: tl.constexpr, BLOCK: tl.constexpr,
                         LIBDEVICE: tl.constexpr, GDC: tl.constexpr):
        row = tl.program_id(0)
        k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        after_previous_kernels(GDC)
        gate = tl.load(gate_up_ptr + row * ld_gate_up + k).to(tl.float32)
        up = tl.load(gate_up_ptr + row * ld_gate_up + INTER + k).to(tl.float32)
        exp = libdevice.exp(-gate) if LIBDEVICE else tl.exp(-gate)
        silu = tl.math.div_rn(gate, 1.0 + exp).to(tl.bfloat16).to(tl.float32)
        x = (silu * up).to(tl.bfloat16)
        tl.store(x_ptr + row * INTER + k, x)
        tl.store(xq_ptr + operand_order_offsets(row, k), x)


def _check(x: torch.Tensor, k: int) -> None:
    if not 1 <= x.shape[0] <= 16 or k % 256 or x.stride(1) != 1:
        raise ValueError(f"x in operand order takes 1-16 rows of a multiple of 256 inputs, contiguous; got "
                         f"{x.shape[0]} x {k}, strides {x.stride()}")


def add_norm_operand_order(residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h = residual + delta, x = MistralRMSNorm(h), x in operand order: 16 * K values, rows past x's
    unwritten), bf16, one launch of one program per row."""
    rows, k = residual.shape
    _check(residual, k)
    _check(delta, k)
    h = torch.empty((rows, k), dtype=torch.bfloat16, device=residual.device)
    x = torch.empty_like(h)
    xq = torch.empty((16 * k,), dtype=torch.bfloat16, device=residual.device)
    _add_norm_kernel[(rows,)](
        residual, delta, norm_weight, h, x, xq, float(eps), residual.stride(0), delta.stride(0), K=k,
        LIBDEVICE=_LIBDEVICE, num_warps=8, **programmatic_options(residual.device),
    )
    return h, x, xq


def silu_mul_operand_order(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x = silu(gate) * up for gate_up = [gate | up], x in operand order), bf16."""
    rows, width = gate_up.shape
    inter = width // 2
    _check(gate_up, inter)
    block = 1024 if inter % 1024 == 0 else 256
    x = torch.empty((rows, inter), dtype=torch.bfloat16, device=gate_up.device)
    xq = torch.empty((16 * inter,), dtype=torch.bfloat16, device=gate_up.device)
    _silu_mul_kernel[(rows, inter // block)](
        gate_up, x, xq, gate_up.stride(0), INTER=inter, BLOCK=block, LIBDEVICE=_LIBDEVICE, num_warps=4,
        **programmatic_options(gate_up.device),
    )
    return x, xq
