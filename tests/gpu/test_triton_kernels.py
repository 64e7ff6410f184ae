"""The decode Triton kernels against PyTorch on fresh random inputs (GPU only, device tool)."""

from __future__ import annotations

import pytest
import torch

from llm.serving import triton_kernels as tk
from llm.serving.mistral_decoder import _rope_decode

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_triton():
    if not tk.available(torch.device("cuda")):
        pytest.skip("Triton has no CUDA backend here")


SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (32000, 4096), (200, 512)]


@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_skinny_matmul_matches_float64(m, n, k):
    torch.manual_seed(m * 7919 + n + k)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    ref = x.double() @ w.double().T
    for config in tk.GEMV_CONFIGS if m == 1 else tk.DOT_CONFIGS:
        if not config.fits(n, k):
            continue
        y = tk.skinny_matmul(x, w, config)
        torch.cuda.synchronize()
        assert y.shape == (m, n) and torch.isfinite(y).all(), config
        error = ((y.double() - ref).norm() / ref.norm()).item()
        # bf16 output rounding only (float32 accumulation): ~2e-3; cuBLAS lands at the same level.
        cublas = ((torch.nn.functional.linear(x, w).double() - ref).norm() / ref.norm()).item()
        assert error < 5e-3 and error < 2 * cublas + 1e-4, (config, error, cublas)


def test_rope_kv_write_matches_eager():
    torch.manual_seed(3)
    heads, kv_heads, dim, seq, batch, n = 32, 8, 128, 2048, 16, 5
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, dtype=torch.bfloat16, device="cuda")
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * torch.rand(dim // 2)[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(torch.bfloat16).cuda(), emb.sin().to(torch.bfloat16).cuda()
    positions = torch.tensor([0, 17, 2047, 513, 3], device="cuda")
    poison = float("nan")
    k_cache = torch.full((batch, kv_heads, seq, dim), poison, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.full_like(k_cache, poison)
    q = tk.rope_kv_write(qkv, cos, sin, positions, k_cache, v_cache, heads, kv_heads, dim)
    # eager bf16 arithmetic (HF's): the kernel must give the same values, bit for bit
    q_ref, k_ref, v_ref = _rope_decode(qkv, cos, sin, positions, heads, kv_heads, dim)
    rows = torch.arange(n, device="cuda")
    assert torch.equal(q, q_ref.reshape(n, -1))
    assert torch.equal(k_cache[rows, :, positions], k_ref)
    assert torch.equal(v_cache[rows, :, positions], v_ref)
    # nothing else written
    assert int((~torch.isnan(k_cache)).sum()) == n * kv_heads * dim
    assert int((~torch.isnan(v_cache)).sum()) == n * kv_heads * dim
