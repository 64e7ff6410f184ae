"""A kernel before the kernel under test that lets it start at once (`griddepcontrol.launch_dependents`) and
writes its output only after ~0.2 ms: a kernel launched programmatically after it that read its input before
`griddepcontrol.wait` would see the old contents (zeros). Shared by tests/gpu/test_programmatic_launch.py and
bench/pdl_rope_check.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SLOW_NS = 200_000


@triton.jit
def _slow_copy_kernel(src_ptr, dst_ptr, n, DELAY_NS: tl.constexpr, BLOCK: tl.constexpr):  # noqa: ANN001
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()  # the next kernel may be scheduled before dst is written
    start = tl.extra.cuda.globaltimer()
    while tl.extra.cuda.globaltimer() - start < DELAY_NS:
        pass
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)


def written_slowly(source: torch.Tensor) -> torch.Tensor:
    """A zeroed copy of `source` that a slow kernel fills, launched programmatically."""
    destination = torch.zeros_like(source)
    block = 1024
    _slow_copy_kernel[(triton.cdiv(source.numel(), block),)](
        source, destination, source.numel(), DELAY_NS=SLOW_NS, BLOCK=block, launch_pdl=True)
    return destination
