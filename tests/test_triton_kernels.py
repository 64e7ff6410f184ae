"""Host-side checks of `llm.serving.triton_kernels` that need no GPU: a call the kernels would serve
wrongly is refused before any launch. The kernels themselves: tests/gpu."""

from __future__ import annotations

import pytest
import torch

from llm.serving import triton_kernels


@pytest.mark.parametrize("paged", [True, False])
def test_rotary_tables_narrower_than_a_head_are_refused(paged):
    # The kernels read head_dim values of row `position`: a half-width table (the usual [positions,
    # head_dim / 2] angle table, not yet doubled) would be read past its end for the later positions
    # (run 44: a GPU test's own tables were, and its result depended on the memory after them).
    heads, kv_heads, head_dim = 4, 2, 16
    qkv = torch.zeros(2, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16)
    half = torch.zeros(64, head_dim // 2)
    pool = torch.zeros(3, kv_heads, 16, head_dim, dtype=torch.bfloat16)
    positions = torch.tensor([5, 40])
    with pytest.raises(ValueError, match=r"rotary tables must be \[positions, 16\]"):
        if paged:
            table = torch.ones(2, 4, dtype=torch.int32)
            triton_kernels.rope_kv_write_paged(qkv, half, half, positions, table, pool, pool.clone(), heads,
                                               kv_heads, head_dim)
        else:
            triton_kernels.rope_kv_write(qkv, half, half, positions, pool, pool.clone(), heads, kv_heads, head_dim)
