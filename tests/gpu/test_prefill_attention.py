"""Prompt attention as the seed computes it: `llm.serving.mistral_decoder._prefill_attention` against the
call transformers' SDPA integration makes for the seed's Mistral (GPU only, device tool)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llm.serving.mistral_decoder import _prefill_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("rows", "length"), [(1, 367), (2, 384), (1, 1500)])
def test_prompt_attention_is_the_seeds_bit_for_bit(rows, length):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(length)
    heads, kv_heads, dim = 32, 8, 128
    q = torch.randn(rows, heads, length, dim, generator=gen).to(torch.bfloat16).cuda()
    k = torch.randn(rows, kv_heads, length, dim, generator=gen).to(torch.bfloat16).cuda()
    v = torch.randn(rows, kv_heads, length, dim, generator=gen).to(torch.bfloat16).cuda()
    scale = dim**-0.5
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    seeds = sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=scale)[0]  # [B, T, H, D]
    ours = _prefill_attention(q, k, v, heads // kv_heads, scale).transpose(1, 2)
    assert torch.equal(ours, seeds)
