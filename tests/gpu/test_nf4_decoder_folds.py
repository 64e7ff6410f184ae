"""`nf4`'s one-row decode step with the kernels' folds (run 34: q/k/v's launch doing the rope kernel's work,
o's launch combining the split attention, the one-byte absmax) against the same decoder with them
switched off, on a Mistral-7B-shaped model of two layers (random NF4 weights, random LoRA): the same
next-token logits but for the combine's rounding steps (device tool; skipped without CUDA)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import pytest
import torch

pytestmark = pytest.mark.gpu


def _seed_like_model(layers: int):  # noqa: ANN202
    """The seed's model shape (bnb NF4 with double quantization, a random LoRA), `layers` layers."""
    import bitsandbytes as bnb
    from transformers import MistralForCausalLM

    from llm.synthetic import add_random_lora, mistral_7b_config

    torch.manual_seed(0)
    config = mistral_7b_config()
    config.num_hidden_layers = layers
    with torch.device("cuda:0"):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                                  compute_dtype=torch.bfloat16, compress_statistics=True,
                                                  quant_type="nf4", device="meta")
                    quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                         compress_statistics=True, quant_type="nf4",
                                                         module=quantized).to("cuda:0")
                    setattr(parent, name, quantized)
    model.is_loaded_in_4bit = True
    return add_random_lora(model, std=0.02).eval()


@contextmanager
def _folds_off(decoder) -> Iterator[None]:  # noqa: ANN001
    """The layers as run 33 served them: no rope or combine fold, float32 absmax."""
    weights = []
    for layer in decoder.layers:
        layer.qkv_rope = layer.after_add_norm_rope = layer.o_after_attention = lambda *_args: None
        for projection in layer.projections.values():
            weights.append((projection, projection.weight))
            projection.weight = replace(projection.weight, compact=None)
    try:
        yield
    finally:
        for layer in decoder.layers:
            del layer.qkv_rope, layer.after_add_norm_rope, layer.o_after_attention
        for projection, weight in weights:
            projection.weight = weight


def test_the_one_row_folds_give_the_separate_kernels_next_token_logits(mistral_tokenizer):
    from llm.serving.mistral_decoder import DecodeGraphs
    from llm.serving.nf4 import build_nf4_engine

    engine = build_nf4_engine(_seed_like_model(2), mistral_tokenizer, max_batch=2, max_seq_len=512)
    try:
        decoder = engine.scheduler.model.graphs.decoder
        assert engine.info.get("nf4_folds_switched_off") == [], engine.info  # the start-up check kept both folds
        assert all(p.weight.compact is not None for layer in decoder.layers for p in layer.projections.values())
        prompt = torch.tensor(mistral_tokenizer("기준금리가 오르면 채권 가격은 어떻게 되나요?").input_ids)
        logits = {}
        for label in ("folds", "separate"):
            with _folds_off(decoder) if label == "separate" else nullcontext():
                graphs = DecodeGraphs(decoder, batch_buckets=[1, decoder.max_batch], kv_buckets=[512])
                graphs.capture()
                try:
                    decoder.kv_release(0)
                    graphs.prefill_many([0], [prompt])
                    steps = [graphs.decode([int(prompt[-1])], [len(prompt)]).float()]
                    steps.append(graphs.decode([int(steps[0].argmax())], [len(prompt) + 1]).float())
                    logits[label] = torch.cat(steps)
                finally:
                    graphs._graphs.clear()  # not close(): the engine owns the decoder
        difference = (logits["folds"] - logits["separate"]).abs().max().item()
        kl = torch.nn.functional.kl_div(logits["folds"].log_softmax(-1), logits["separate"].log_softmax(-1),
                                        log_target=True, reduction="batchmean").item()
        print("NF4_DECODER_FOLDS " + json.dumps({"max_abs_logit_difference": difference, "kl": kl}))
        assert torch.equal(logits["folds"].argmax(-1), logits["separate"].argmax(-1))
        assert kl < 1e-4, kl
        assert not logits["folds"].isnan().any()
    finally:
        engine.close()
