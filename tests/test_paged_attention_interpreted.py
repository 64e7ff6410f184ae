"""`triton_kernels.paged_rope_attention` (rope + KV write inside the paged attention launch, built
in run 40, not served yet) against the served pair `rope_kv_write_paged` + `paged_decode_attention`,
both run on the CPU by Triton's interpreter (`TRITON_INTERPRET=1`, read at import, hence a
subprocess): the same pool and the same output bits, for the kernels alone and for a decode step of the
tiny model. Two limits of the interpreter make the GPU test (tests/gpu/test_paged_attention.py) the
check of the values and of races: its `tl.dot` on bf16 operands is not the real product (numpy has no
bf16), so equal outputs here show that the same operands reach the same operations; and it runs a grid's
programs one after another, so it cannot show which program writes the new position first."""

from __future__ import annotations

from tests.triton_interpreter import needs_triton, run_interpreted

pytestmark = needs_triton

CHECK = """
import json, torch
from llm.serving import triton_kernels as tk

torch.manual_seed(0)
heads, kv_heads, dim, block_size, max_blocks, n = 4, 2, 16, 16, 6, 4
num_blocks = 1 + n * max_blocks
k_pool = torch.randn(num_blocks, kv_heads, block_size, dim).to(torch.bfloat16)
v_pool = torch.randn(num_blocks, kv_heads, block_size, dim).to(torch.bfloat16)
order = (torch.randperm(num_blocks - 1) + 1).to(torch.int32)
table = order[: n * max_blocks].view(n, max_blocks).contiguous()
# the first position, the first of a page, the middle of the third split, the last of a page
positions = torch.tensor([0, 16, 70, 95])
qkv = torch.randn(n, (heads + 2 * kv_heads) * dim).to(torch.bfloat16)
angles = torch.arange(128, dtype=torch.float32)[:, None] * torch.rand(dim // 2)[None, :]
cos = torch.cat((angles, angles), dim=-1).cos().to(torch.bfloat16)
sin = torch.cat((angles, angles), dim=-1).sin().to(torch.bfloat16)
scale = dim ** -0.5
k_served, v_served = k_pool.clone(), v_pool.clone()
q = tk.rope_kv_write_paged(qkv, cos, sin, positions, table, k_served, v_served, heads, kv_heads, dim)
served = tk.paged_decode_attention(q, k_served, v_served, table, positions, scale, heads)
k_fused, v_fused = k_pool.clone(), v_pool.clone()
fused = tk.paged_rope_attention(qkv, cos, sin, positions, table, k_fused, v_fused, scale, heads, kv_heads, dim)
print(json.dumps({
    "out_equal": bool(torch.equal(served, fused)),
    "pool_equal": bool(torch.equal(k_served, k_fused) and torch.equal(v_served, v_fused)),
    "written": int((k_fused != k_pool).any(-1).sum()),
}))
"""


DECODER_CHECK = """
import json, tempfile, torch
from pathlib import Path
from llm.loading import load_reference_model
from llm.serving.fast import build_merged_decoder
from llm.synthetic import build_random_checkpoint

base, adapter = build_random_checkpoint(Path(tempfile.mkdtemp()))
model = load_reference_model(str(base), str(adapter), "cpu")
decoder = build_merged_decoder(model, max_batch=4, max_seq_len=256, dtype=torch.bfloat16, kv_cache_tokens=1024,
                               kv_block_size=16)
decoder.prefill_many([0, 1], [torch.tensor([1, 5, 9, 200, 31, 7]), torch.arange(1, 40)])
tokens, positions = torch.tensor([11, 12]), torch.tensor([6, 39])
for row, position in enumerate(positions.tolist()):
    decoder.kv_reserve(row, position + 1)
decoder.block_table[:2].copy_(decoder.kv.table[:2])
decoder.fused_rope_kv = True  # the Triton decode path, as on a GPU
before = [pool.clone() for pool in decoder.k_cache + decoder.v_cache]
served = decoder.decode_step(tokens, positions, 256)
served_pools = [pool.clone() for pool in decoder.k_cache + decoder.v_cache]
for pool, saved in zip(decoder.k_cache + decoder.v_cache, before):
    pool.copy_(saved)
decoder.rope_in_attention = True
from llm.serving import triton_kernels
launches = []
fused_launch = triton_kernels.paged_rope_attention
triton_kernels.paged_rope_attention = lambda *args, **kwargs: launches.append(1) or fused_launch(*args, **kwargs)
fused = decoder.decode_step(tokens, positions, 256)
print(json.dumps({
    "fused_launches": len(launches),
    "logits_equal": bool(torch.equal(served, fused)),
    "pools_equal": all(torch.equal(a, b) for a, b in zip(served_pools, decoder.k_cache + decoder.v_cache)),
}))
"""



def test_rope_inside_the_paged_attention_launch_gives_the_served_pairs_pool_and_bits():
    report = run_interpreted(CHECK)
    assert report["written"] == 4 * 2, report  # each row's new position, each KV head
    assert report["pool_equal"] and report["out_equal"], report


def test_the_decoder_with_rope_inside_the_attention_launch_gives_the_served_steps_logits():
    """`MistralDecoder.rope_in_attention` routes a paged decode step (the tiny model, two layers)
    through the fused launch: the same logits and KV pool, bit for bit."""
    report = run_interpreted(DECODER_CHECK)
    assert report == {"fused_launches": 2, "logits_equal": True, "pools_equal": True}, report
