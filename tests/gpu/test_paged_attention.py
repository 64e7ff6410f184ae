"""The paged-KV Triton kernels against the pure-PyTorch reference (gather by block table + SDPA),
on random inputs: several lengths around block boundaries, batch sizes, block sizes, GQA shapes.
GPU only (device tool); run with -s to see the timing against run 6's static-cache SDPA."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llm.serving import triton_kernels as tk
from llm.serving.mistral_decoder import _rope_decode

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_triton():
    if not tk.available(torch.device("cuda")):
        pytest.skip("Triton has no CUDA backend here")


def _random_paged(lengths, kv_heads, dim, block_size, seed, max_seq_len=2048):
    """A pool holding every row's KV in randomly placed blocks (block 0 = scratch, poisoned)."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = -(-max_seq_len // block_size)
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + 1
    k_pool = torch.randn(num_blocks, kv_heads, block_size, dim, generator=gen).to(torch.bfloat16).cuda()
    v_pool = torch.randn(num_blocks, kv_heads, block_size, dim, generator=gen).to(torch.bfloat16).cuda()
    k_pool[0] = float("nan")  # a kernel that reads the scratch block for a live row fails loudly
    v_pool[0] = float("nan")
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(lengths), max_blocks, dtype=torch.int32)
    for row, count in enumerate(needed):
        table[row, :count] = torch.tensor(order[:count], dtype=torch.int32)
        order = order[count:]
        tail = lengths[row] % block_size
        if tail:  # stale positions after the row's end in its last block: must never be read
            k_pool[table[row, count - 1], :, tail:] = float("nan")
            v_pool[table[row, count - 1], :, tail:] = float("nan")
    return k_pool, v_pool, table.cuda()


def _reference(q, k_pool, v_pool, table, lengths, num_heads, scale):
    """Gather each row's blocks in table order, SDPA (float32) over its real length."""
    out = []
    _, kv_heads, block_size, dim = k_pool.shape
    group = num_heads // kv_heads
    for row, length in enumerate(lengths):
        pages = -(-length // block_size)
        blocks = table[row, :pages].long()
        k = k_pool[blocks].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :length].float()
        v = v_pool[blocks].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :length].float()
        qr = q[row].view(num_heads, 1, dim).float()
        attn = F.scaled_dot_product_attention(
            qr, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), scale=scale
        )
        out.append(attn.reshape(-1))
    return torch.stack(out)


CASES = [
    # (lengths, block_size)
    ([1], 32),
    ([2048], 32),
    ([31, 32, 33], 32),
    ([15, 16, 17, 1, 100], 16),
    ([513, 64, 1, 2000, 257, 256, 255, 1024, 7, 999, 1500, 33, 640, 128, 2047, 300], 32),
    ([700] * 16, 64),
]


@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (4, 2, 16)])
@pytest.mark.parametrize("lengths,block_size", CASES)
def test_paged_decode_attention_matches_gather_sdpa(heads, kv_heads, dim, lengths, block_size):
    k_pool, v_pool, table = _random_paged(lengths, kv_heads, dim, block_size, seed=len(lengths) + block_size)
    n = len(lengths)
    q = torch.randn(n, heads * dim, device="cuda").to(torch.bfloat16)
    positions = torch.tensor(lengths, device="cuda") - 1
    scale = dim**-0.5
    expected = _reference(q, k_pool, v_pool, table, lengths, heads, scale)
    for split_pages in (None, 1, 3):
        got = tk.paged_decode_attention(q, k_pool, v_pool, table, positions, scale, heads, split_pages)
        torch.cuda.synchronize()
        assert got.shape == (n, heads * dim) and torch.isfinite(got).all()
        # P is rounded to bf16 before P @ V (as flash attention does) and the output to bf16.
        torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_rope_kv_write_paged_matches_eager():
    torch.manual_seed(3)
    heads, kv_heads, dim, seq, block_size = 32, 8, 128, 2048, 32
    n = 5
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, dtype=torch.bfloat16, device="cuda")
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * torch.rand(dim // 2)[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(torch.bfloat16).cuda(), emb.sin().to(torch.bfloat16).cuda()
    positions = torch.tensor([1, 17, 2047, 513, 32], device="cuda")
    pool_shape = (40, kv_heads, block_size, dim)
    k_pool = torch.full(pool_shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    v_pool = torch.full_like(k_pool, float("nan"))
    table = torch.zeros(n, seq // block_size, dtype=torch.int32)
    for row in range(n):
        table[row] = torch.randint(1, 40, (seq // block_size,))
    table[2, 2047 // 32] = 7  # distinct destination blocks for the 5 rows
    table[0, 0], table[1, 0], table[3, 16], table[4, 1] = 3, 9, 21, 30
    table = table.cuda()
    q = tk.rope_kv_write_paged(qkv, cos, sin, positions, table, k_pool, v_pool, heads, kv_heads, dim)
    # eager bf16 arithmetic (HF's): the kernel must give the same values, bit for bit
    q_ref, k_ref, v_ref = _rope_decode(qkv, cos, sin, positions, heads, kv_heads, dim)
    rows = torch.arange(n, device="cuda")
    blocks = table[rows, positions // block_size].long()
    offsets = positions % block_size
    assert torch.equal(q, q_ref.reshape(n, -1))
    assert torch.equal(k_pool[blocks, :, offsets], k_ref)
    assert torch.equal(v_pool[blocks, :, offsets], v_ref)
    assert int((~torch.isnan(k_pool)).sum()) == n * kv_heads * dim


def test_report_paged_attention_time_against_static_sdpa():
    """Not a pass/fail target: one layer's decode attention, batch 16, GQA 32/8, d 128. Run 6
    read the static cache up to the KV bucket with a masked SDPA; the paged kernel reads each
    row's own length (here: all rows at the bucket, and a staggered-like mix of real lengths)."""
    heads, kv_heads, dim, n = 32, 8, 128, 16
    q = torch.randn(n, heads * dim, device="cuda").to(torch.bfloat16)
    q4 = q.view(n, kv_heads, heads // kv_heads, dim)
    report = {}
    for kv in (512, 1024, 2048):
        k_static = torch.randn(n, kv_heads, kv, dim, device="cuda").to(torch.bfloat16)
        v_static = torch.randn_like(k_static)
        mask = torch.zeros(n, 1, 1, kv, dtype=torch.bfloat16, device="cuda")
        report[f"sdpa_static_b16_kv{kv}_us"] = round(1000 * tk.graph_time_ms(
            lambda k=k_static, v=v_static, m=mask: F.scaled_dot_product_attention(q4, k, v, attn_mask=m)), 1)
        del k_static, v_static
        for label, lengths in (("full", [kv] * n), ("mix", [max(1, kv * (i + 1) // n) for i in range(n)])):
            k_pool, v_pool, table = _random_paged(lengths, kv_heads, dim, 32, seed=kv)
            positions = torch.tensor(lengths, device="cuda") - 1
            report[f"paged_b16_kv{kv}_{label}_us"] = round(1000 * tk.graph_time_ms(
                lambda k=k_pool, v=v_pool, t=table, p=positions:
                tk.paged_decode_attention(q, k, v, t, p, dim**-0.5, heads)), 1)
    q1 = q[:1].contiguous()
    for kv in (256, 2048):
        k_pool, v_pool, table = _random_paged([kv], kv_heads, dim, 32, seed=kv)
        positions = torch.tensor([kv - 1], device="cuda")
        report[f"paged_b1_kv{kv}_us"] = round(1000 * tk.graph_time_ms(
            lambda k=k_pool, v=v_pool, t=table, p=positions: tk.paged_decode_attention(q1, k, v, t, p, dim**-0.5, heads)), 1)
    print("PAGED_ATTENTION_TIMES " + json.dumps(report))
