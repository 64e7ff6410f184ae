"""`nf4` mode on the CPU: the seed's NF4 bytes and unmerged LoRA, computed as bitsandbytes + PEFT do.

The Triton kernels only run on CUDA (tests/gpu); these tests pin the reference path the kernels
are checked against, on the tiny model loaded exactly as the seed loads the real one.
"""

from __future__ import annotations

import pytest
import torch

from llm.engine import SamplingParams
from llm.fidelity import KOREAN_FINANCE_TEXT
from llm.loading import build_engine, load_reference_model
from llm.serving.fast import base_weight
from llm.serving.nf4 import NF4_CODE, LoraParts, NF4Matrix, NF4Projection, build_nf4_decoder


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoint):
    return load_reference_model(str(tiny_checkpoint.base_dir), str(tiny_checkpoint.adapter_dir), "cpu")


@pytest.fixture(scope="module")
def korean_ids(mistral_tokenizer):
    return mistral_tokenizer(KOREAN_FINANCE_TEXT).input_ids[:96]


def _layer(model):  # noqa: ANN001, ANN202
    return model.base_model.model.model.layers[0]


def test_dequantized_values_are_bitsandbytes_own_bit_for_bit(reference_model):
    for module in (_layer(reference_model).self_attn.q_proj, _layer(reference_model).mlp.down_proj):
        base = module.get_base_layer()
        ours = NF4Matrix.from_bnb(base.weight).dequantize(torch.bfloat16)
        theirs = base_weight(base).to(torch.bfloat16)
        assert ours.dtype == theirs.dtype and torch.equal(ours.view(torch.int16), theirs.view(torch.int16))


def test_a_projection_is_the_peft_module_computed_with_peft_roundings(reference_model):
    module = _layer(reference_model).mlp.gate_proj
    projection = NF4Projection(NF4Matrix.from_bnb(module.get_base_layer().weight), LoraParts.from_peft([module]))
    x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    dequant = base_weight(module.get_base_layer()).to(torch.bfloat16)
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    # PEFT's bnb 4-bit LoRA layer: base in bf16, LoRA in the adapter's dtype rounded to bf16, bf16 sum.
    expected = torch.nn.functional.linear(x, dequant) + (
        torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b) * module.scaling["default"]
    ).to(torch.bfloat16)
    assert torch.equal(projection(x), expected)
    # The LoRA is in: without it the output differs.
    assert not torch.equal(projection(x), torch.nn.functional.linear(x, dequant))


def test_fused_parts_keep_each_projections_own_adapter(reference_model):
    attn = _layer(reference_model).self_attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    fused = NF4Projection(
        NF4Matrix.concat([NF4Matrix.from_bnb(p.get_base_layer().weight) for p in parts]), LoraParts.from_peft(parts)
    )
    x = torch.randn(3, attn.q_proj.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    singles = [NF4Projection(NF4Matrix.from_bnb(p.get_base_layer().weight), LoraParts.from_peft([p]))(x) for p in parts]
    assert torch.equal(fused(x), torch.cat(singles, dim=-1))


def test_nf4_decoder_matches_the_seeds_peft_model(reference_model, korean_ids):
    with torch.no_grad():
        expected = reference_model(torch.tensor([korean_ids])).logits[0].float()
        ours = build_nf4_decoder(reference_model, max_batch=1, max_seq_len=256).prefill(
            0, torch.tensor(korean_ids), all_logits=True
        ).float()
        with reference_model.disable_adapter():
            without_adapter = reference_model(torch.tensor([korean_ids])).logits[0].float()
    # bitsandbytes' CPU kernel multiplies in its own order (on CUDA, prompts are dequantized and
    # multiplied exactly as here): rounding only, far below the adapter's own effect.
    error = (ours - expected).abs().max().item()
    assert error < 0.03, error
    assert (without_adapter - expected).abs().max().item() > 5 * error


def test_nf4_engine_greedy_agrees_with_the_seed_path(tiny_checkpoint, mistral_tokenizer):
    reference = build_engine("reference", str(tiny_checkpoint.base_dir), str(tiny_checkpoint.adapter_dir), "cpu")
    engine = build_engine(
        "nf4", str(tiny_checkpoint.base_dir), str(tiny_checkpoint.adapter_dir), "cpu",
        max_batch=3, max_seq_len=128, max_queue=5, kv_cache_tokens=256, kv_block_size=16,
    )
    try:
        assert engine.name == "nf4" and engine.info["kv_paged"] and engine.info["nf4_kernels"] is False
        prompt = mistral_tokenizer("[INST]기준금리가 뭐야? [/INST]").input_ids
        greedy = SamplingParams(max_new_tokens=32, greedy=True)
        ids_ref = list(reference.model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
            pad_token_id=mistral_tokenizer.eos_token_id,
        )[0, len(prompt):])
        ids_nf4 = list(engine.stream_tokens(prompt, greedy, ignore_eos=True))
        assert ids_nf4 == [int(i) for i in ids_ref]
        sampled = engine.generate(prompt, SamplingParams(max_new_tokens=8, seed=3))
        assert engine.generate(prompt, SamplingParams(max_new_tokens=8, seed=3)) == sampled
    finally:
        engine.close()
        reference.close()


def test_the_decode_step_folds_its_element_wise_pieces_into_the_layers_launches_without_changing_the_answer(
    reference_model, korean_ids, monkeypatch
):
    """Where a layer offers them (`nf4`'s one-row x-table kernel on a GPU), the decode step hands the
    residual add + RMSNorm to the next q/k/v or gate/up launch and `silu(gate) * up` to down's: the
    logits stay bit for bit the separate steps'. Here the offered steps compute what the kernel must
    (its own test checks the kernel against them), so this pins the residual and norm the folded
    path is handed (which layer the decoder asks: the greedy test above)."""
    from llm.serving import nf4
    from llm.serving.mistral_decoder import _add_rms_norm, _silu_mul

    decoder = build_nf4_decoder(reference_model, max_batch=1, max_seq_len=64, kv_cache_tokens=64, kv_block_size=16)
    assert decoder.paged
    generator = torch.Generator().manual_seed(0)
    for layer in decoder.layers:  # the tiny model's norms are all ones: a swapped one would go unseen
        width = layer.input_norm.shape
        layer.input_norm, layer.post_norm = (
            (1 + 0.5 * torch.randn(width, generator=generator)).to(layer.input_norm.dtype) for _ in range(2)
        )
    prompt, following = korean_ids[:8], korean_ids[8:20]

    def decode() -> torch.Tensor:
        assert decoder.kv_reserve(0, 32)
        decoder.block_table[:1].copy_(decoder.kv.table[:1])  # as `DecodeGraphs.decode` does per step
        decoder.prefill(0, torch.tensor(prompt))
        logits = [decoder.decode_step(torch.tensor([token]), torch.tensor([len(prompt) + i]), 32)
                  for i, token in enumerate(following)]
        decoder.kv_release(0)
        return torch.cat(logits)

    calls = {"add_norm": 0, "silu_mul": 0}

    def after_add_norm(self, residual, delta, norm_weight, eps):  # noqa: ANN001, ANN202
        calls["add_norm"] += 1
        h, x = _add_rms_norm(residual, delta, norm_weight, eps)
        return h, self(x)

    def after_silu_mul(self, gate_up):  # noqa: ANN001, ANN202
        calls["silu_mul"] += 1
        return self(_silu_mul(gate_up))

    with torch.no_grad():
        separate = decode()
        monkeypatch.setattr(nf4.NF4Projection, "after_add_norm", after_add_norm)
        monkeypatch.setattr(nf4.NF4Projection, "after_silu_mul", after_silu_mul)
        folded = decode()
    layers = len(decoder.layers)
    # per step: gate/up in every layer, q/k/v in every layer but the first (its input is the embedding)
    assert calls == {"add_norm": len(following) * (2 * layers - 1), "silu_mul": len(following) * layers}
    assert torch.equal(folded, separate)


def test_the_offline_nf4_table_is_bitsandbytes_own():
    """`NF4_CODE` stands in for a model's table where none is loaded (offline compiles, emulated kernels)."""
    import bitsandbytes.functional as bnbf

    assert bnbf.get_4bit_type("nf4", device="cpu").tolist() == list(NF4_CODE)
