"""The Triton sampler (`llm.serving.triton_sampling`) run on the CPU by Triton's interpreter
(`TRITON_INTERPRET=1`, read at import, hence a subprocess), with small chunks so that it takes
seconds: the same tokens as PyTorch's sampler for the same uniforms, argmax's pick for greedy and
top_k=1 rows (equal maxima, the best token in the last, partial chunk), with Triton's bitonic top-k
and with the full sort that serves where Triton has none. The real sizes and the GPU's rounding:
tests/gpu/test_triton_sampling.py."""

from __future__ import annotations

import pytest

from tests.triton_interpreter import needs_triton, run_interpreted

pytestmark = needs_triton

CHECK = """
import json, torch
from llm.engine import SamplingParams
from llm.serving import batching, triton_sampling

triton_sampling.HAS_TOPK = triton_sampling.HAS_TOPK and USE_TOPK
torch.manual_seed(0)
vocab = 300  # 5 chunks of 64 (padded to 8), the last one partial
sampled = [SamplingParams(top_k=16), SamplingParams(top_k=16, top_p=0.9, temperature=0.7),
           SamplingParams(top_k=12, top_p=1.0, temperature=1.3)]
# every sampled setting at eight uniforms spread over [0, 1): the draws walk its whole kept set
params = [p for p in sampled for _ in range(8)] + [SamplingParams(greedy=True)] * 2 + [SamplingParams(top_k=1)]
rows = len(params)
u = ((torch.arange(rows) % 8) + 0.5) / 8
logits = torch.randn(3, vocab).repeat_interleave(8, 0)
logits = torch.cat([logits, torch.randn(3, vocab) * 3])
logits[24, 299] = logits[24].max() + 5  # the best token in the last, partial chunk
logits[25, 10] = logits[25, 200] = logits[25].max() + 1  # equal maxima: the lower id, as argmax
torch.rand = lambda n, device=None: u.to(device)  # PyTorch's sampler draws these uniforms too
expected = batching.sample_tokens(logits, params, [None] * rows)  # PyTorch's kernels on the CPU
settings = batching._param_tensors(tuple(params), vocab, torch.device("cpu"))
got = triton_sampling.draw(logits, settings.temperature, settings.top_p, settings.top_k, settings.greedy, u,
                           chunk=64, candidates=16)
print(json.dumps({"topk": triton_sampling.HAS_TOPK, "got": got.tolist(), "expected": expected.tolist(), "argmax": logits[24:].argmax(-1).tolist(),
                  "distinct": [len(set(got[i:i + 8].tolist())) for i in (0, 8, 16)]}))
"""


@pytest.mark.parametrize("use_topk", [True, False], ids=["bitonic_topk", "full_sort"])
def test_the_triton_sampler_draws_pytorchs_tokens_and_argmaxs_picks(use_topk):
    report = run_interpreted(f"USE_TOPK = {use_topk}\n" + CHECK)
    if use_topk and not report["topk"]:
        pytest.skip("this Triton has no tl.topk: the full sort serves")
    assert report["topk"] == use_topk
    assert report["got"][24:] == report["argmax"] and report["argmax"][:2] == [299, 10], report
    assert all(distinct > 1 for distinct in report["distinct"]), report  # the uniforms reach past rank 0
    assert report["got"] == report["expected"], report
