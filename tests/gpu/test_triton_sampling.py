"""The two-launch Triton sampler against the PyTorch one, same uniforms (GPU only, device tool)."""

from __future__ import annotations

import json

import pytest
import torch

from llm.engine import SamplingParams
from llm.serving import batching, triton_sampling

pytestmark = pytest.mark.gpu

VOCAB = 32000


@pytest.fixture(autouse=True)
def _needs_triton():
    if not triton_sampling.serves(torch.device("cuda"), VOCAB, 50):
        pytest.skip("Triton has no CUDA backend here")


def _both(logits: torch.Tensor, params: list[SamplingParams], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Triton's tokens, PyTorch's tokens) for the same uniforms."""
    settings = batching._param_tensors(tuple(params), logits.shape[1], logits.device)
    u = torch.rand(logits.shape[0], device=logits.device, generator=torch.Generator("cuda").manual_seed(seed))
    return batching._triton_draw(logits, settings, u), batching._pytorch_draw(logits, settings, u)


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_the_triton_sampler_draws_pytorchs_tokens(rows):
    torch.manual_seed(rows)
    mixed = [SamplingParams(), SamplingParams(greedy=True), SamplingParams(top_k=1),
             SamplingParams(top_k=64, top_p=1.0, temperature=1.3), SamplingParams(top_k=7, top_p=0.5, temperature=0.5)]
    params = [mixed[row % len(mixed)] for row in range(rows)]
    same = total = 0
    for trial in range(200):
        # logits spread like a language model's: a few tokens well ahead of a long flat tail
        logits = torch.randn(rows, VOCAB, device="cuda") * 2
        logits[:, torch.randint(0, VOCAB, (20,))] += torch.rand(20, device="cuda") * 12
        fused, eager = _both(logits, params, seed=trial)
        same += int((fused == eager).sum())
        total += rows
        argmax = logits.argmax(-1)
        for row, p in enumerate(params):
            if p.greedy or p.top_k == 1:
                assert fused[row] == argmax[row], (trial, row)
    # Only a token within a rounding step of the top_p edge or of u may differ
    assert same >= 0.995 * total, (same, total)


def test_equal_maxima_and_the_last_partial_chunk_pick_as_argmax_does():
    logits = torch.randn(4, VOCAB, device="cuda")
    logits[0, VOCAB - 1] = 100.0  # in the last chunk, beyond 31 x 1,024
    logits[1, 5000] = logits[1, 12] = 100.0  # equal maxima: the lower id, as argmax
    logits[2, :] = 0.0  # all equal
    logits[3, 31744:] = 50.0  # a whole partial chunk tied
    params = [SamplingParams(greedy=True), SamplingParams(top_k=1), SamplingParams(greedy=True), SamplingParams(top_k=1)]
    fused, _ = _both(logits, params, seed=0)
    assert fused.tolist() == logits.argmax(-1).tolist() == [VOCAB - 1, 12, 0, 31744]


def test_the_start_up_check_passes_and_switches_a_broken_sampler_off(monkeypatch, caplog):
    monkeypatch.setattr(triton_sampling, "HAS_TOPK", triton_sampling.HAS_TOPK)  # restored after the test
    info = batching.check_triton_sampling(torch.device("cuda"), VOCAB)
    # which path passed (Triton's bitonic top-k, or the full sort where this Triton's failed): reported, not
    # asserted, so that the bench after these tests still runs
    print("TRITON_SAMPLING_START_UP_CHECK " + json.dumps(info))
    assert info["triton_sampling"] is True
    monkeypatch.setattr(triton_sampling, "draw", lambda logits, *_: logits.argmin(-1))  # wrong tokens
    try:
        info = batching.check_triton_sampling(torch.device("cuda"), VOCAB)
        assert info["triton_sampling"] is False and "rows" in info["triton_sampling_error"]
        assert not triton_sampling.serves(torch.device("cuda"), VOCAB, 50)
        assert "Triton sampling switched off" in caplog.text
    finally:
        triton_sampling.switch_off(None)  # on before the test (the fixture's skip says so)


def test_sample_tokens_on_the_gpu_keeps_hfs_distribution():
    """Through `sample_tokens` (which takes the Triton path here): the kept set and the frequencies
    of HF's temperature -> top-k -> top-p processors."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(1)
    logits = torch.randn(1, VOCAB) * 3
    scores = logits.clone()
    for warper in (TemperatureLogitsWarper(0.9), TopKLogitsWarper(50), TopPLogitsWarper(0.8)):
        scores = warper(None, scores)
    expected = torch.softmax(scores, dim=-1)[0]
    counts = torch.zeros(VOCAB)
    batch = logits.expand(16, -1).contiguous().cuda()
    for _ in range(4000):
        for token in batching.sample_next(batch, [SamplingParams()] * 16, [None] * 16):
            counts[token] += 1
    assert set(counts.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    # 64,000 draws from these 29 tokens: sampling noise alone gives a total distance of 0.016 on average,
    # 0.021 at the 99th percentile (16,000 draws, run 42's first version: 0.032 on average)
    assert ((counts / counts.sum()) - expected).abs().sum() < 0.03
