"""Mode selection, the LoRA merge and the custom decoder, on the tiny model (CPU)."""

from __future__ import annotations

import pytest
import torch

from llm.loading import gpu_total_gb, load_reference_model, resolve_engine_choice
from llm.serving.fast import build_merged_decoder, build_module_decoder
from llm.serving.mistral_decoder import DecodeGraphs

KOREAN = "한국은행은 기준금리를 연 3.50%로 동결했습니다. 코스피는 외국인 매수에 힘입어 상승 마감했다."


def test_auto_is_fast_on_cuda_and_reference_on_cpu():
    assert resolve_engine_choice("auto", "cuda:0") == "fast"
    assert resolve_engine_choice("auto", "cuda") == "fast"
    assert resolve_engine_choice("auto", "cpu") == "reference"
    for explicit in ("reference", "fast", "low-memory", "fake"):
        assert resolve_engine_choice(explicit, "cuda:0") == explicit
        assert resolve_engine_choice(explicit, "cpu") == explicit


def test_auto_serves_nf4_on_a_gpu_too_small_for_fast():
    # total memory as torch reports it: a 16 GiB card cannot hold fast's 16 GB peak beside the CUDA
    # context; a 24 GB and an 80 GB one can
    assert resolve_engine_choice("auto", "cuda:0", 17.1) == "nf4"
    assert resolve_engine_choice("auto", "cuda:0", 12.0) == "nf4"
    assert resolve_engine_choice("auto", "cuda:1", 25.3) == "fast"
    assert resolve_engine_choice("auto", "cuda:0", 85.0) == "fast"
    assert resolve_engine_choice("auto", "cpu", 12.0) == "reference"
    assert resolve_engine_choice("fast", "cuda:0", 12.0) == "fast"  # asked for by name: as asked
    assert gpu_total_gb("cpu") is None


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoint):
    return load_reference_model(str(tiny_checkpoint.base_dir), str(tiny_checkpoint.adapter_dir), "cpu")


@pytest.fixture(scope="module")
def korean_ids(mistral_tokenizer):
    return mistral_tokenizer(KOREAN).input_ids


def _peft_logits(model, ids: list[int], adapter: bool = True) -> torch.Tensor:
    with torch.no_grad():
        if adapter:
            return model(torch.tensor([ids])).logits[0].float()
        with model.disable_adapter():
            return model(torch.tensor([ids])).logits[0].float()


def test_merged_model_matches_peft_over_4bit_base(reference_model, korean_ids):
    """The merged bf16->float32 model computes dequant(W_nf4) + scaling*B@A: PeftModel's function."""
    from bitsandbytes.nn import Linear4bit

    lm = reference_model.base_model.model
    assert isinstance(lm.model.layers[0].self_attn.q_proj.get_base_layer(), Linear4bit)
    expected = _peft_logits(reference_model, korean_ids)
    decoder = build_merged_decoder(reference_model, max_batch=1, max_seq_len=256, dtype=torch.float32)
    merged = decoder.prefill(0, torch.tensor(korean_ids), all_logits=True)
    error = (merged - expected).abs().max().item()
    # PeftModel computes in bf16, the merged copy in float32: rounding only.
    assert error < 0.03, error
    # ...and the adapter's own effect is far larger, so a wrong merge (scaling, lm_head) would fail.
    adapter_effect = (_peft_logits(reference_model, korean_ids, adapter=False) - expected).abs().max().item()
    assert adapter_effect > 5 * error, (adapter_effect, error)
    # the model is still usable (free_source=False)
    assert torch.equal(_peft_logits(reference_model, korean_ids), expected)


def test_merged_lm_head_includes_adapter(reference_model):
    from llm.serving.fast import merged_weight

    head = reference_model.base_model.model.lm_head  # PEFT's LoRA layer (eval: no dropout)
    merged = merged_weight(head, torch.float32)
    x = torch.randn(5, merged.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_out = head(x.to(head.get_base_layer().weight.dtype)).float()
        base_out = head.get_base_layer()(x.to(head.get_base_layer().weight.dtype)).float()
    ours = x @ merged.T
    error = (ours - peft_out).abs().max().item()
    assert error < 0.05 * (peft_out - base_out).abs().max().item(), error  # the adapter's effect is in


def test_low_memory_decoder_matches_peft(reference_model, korean_ids):
    decoder = build_module_decoder(reference_model, max_batch=1, max_seq_len=256)
    logits = decoder.prefill(0, torch.tensor(korean_ids), all_logits=True)
    torch.testing.assert_close(logits, _peft_logits(reference_model, korean_ids), atol=2e-2, rtol=0)


@pytest.mark.parametrize("kv_cache_tokens", [None, 160], ids=["static", "paged"])
def test_decoder_matches_hf_with_batches_of_different_lengths(tiny_checkpoint, mistral_tokenizer, kv_cache_tokens):
    """Ragged prompts prefilled into their slots, then decoded together one token a step at
    different positions, give HF MistralForCausalLM's logits at every step. Paged: 16-token
    blocks, so prompts and steps cross block boundaries, and slot 3 stays idle (scratch block)."""
    from transformers import MistralForCausalLM

    hf = MistralForCausalLM.from_pretrained(tiny_checkpoint.base_dir, dtype=torch.float32).eval()
    texts = [KOREAN, "금리 인상", "The KOSPI index rose 1.2% on Tuesday as chip stocks rallied."]
    sequences = [mistral_tokenizer(t).input_ids for t in texts]
    prompt_lengths = [len(s) - 6 for s in sequences]
    decoder = build_merged_decoder(hf, max_batch=4, max_seq_len=128, dtype=torch.float32,
                                   kv_cache_tokens=kv_cache_tokens, kv_block_size=16)
    graphs = DecodeGraphs(decoder, use_graphs=False, kv_buckets=[32, 64, 128])
    for slot, (ids, length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        last = decoder.prefill(slot, torch.tensor(ids[:length]))
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(last, expected[length - 1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        full = [hf(torch.tensor([ids])).logits[0] for ids in sequences]
    for step in range(5):
        positions = [length + step for length in prompt_lengths]
        tokens = [ids[p] for ids, p in zip(sequences, positions, strict=True)]
        logits = graphs.decode(tokens, positions)
        for row in range(len(sequences)):
            torch.testing.assert_close(logits[row], full[row][positions[row]], atol=1e-4, rtol=1e-4)
    if kv_cache_tokens is not None:  # blocks interleave across slots: the tables did the work
        assert decoder.kv.blocks[0] and 0 not in sum(decoder.kv.blocks, [])
        for slot in range(4):
            decoder.kv_release(slot)
        assert decoder.kv.free_tokens == 160


def test_paged_pool_allocates_all_or_nothing_and_never_hands_out_the_scratch_block(reference_model):
    decoder = build_merged_decoder(reference_model, max_batch=2, max_seq_len=64, dtype=torch.float32,
                                   kv_cache_tokens=64, kv_block_size=16)
    kv = decoder.kv
    assert kv.num_blocks == 5 and kv.free_tokens == 64
    assert decoder.kv_reserve(0, 40)  # 3 blocks
    assert not decoder.kv_reserve(1, 17)  # needs 2, 1 free: nothing taken
    assert kv.free_tokens == 16 and kv.blocks[1] == []
    assert decoder.kv_reserve(1, 16)
    assert sorted(kv.blocks[0] + kv.blocks[1]) == [1, 2, 3, 4]
    assert kv.table[0, :3].tolist() == kv.blocks[0] and kv.table[0, 3] == 0
    decoder.kv_release(0)
    assert kv.free_tokens == 48 and kv.table[0].abs().sum() == 0
    decoder.prefill(1, torch.ones(64, dtype=torch.long))  # 4 blocks: slot 1 owns 1, 3 free: ok
    assert kv.free_tokens == 0 and len(kv.blocks[1]) == 4
    with pytest.raises(RuntimeError, match="KV cache full"):
        decoder.prefill(0, torch.ones(20, dtype=torch.long))  # now nothing is free
    assert kv.blocks[0] == []


def test_decode_rejects_positions_beyond_cache(reference_model):
    decoder = build_merged_decoder(reference_model, max_batch=2, max_seq_len=64, dtype=torch.float32)
    graphs = DecodeGraphs(decoder, use_graphs=False)
    with pytest.raises(ValueError):
        graphs.decode([1], [64])
    with pytest.raises(ValueError):
        decoder.prefill(0, torch.ones(65, dtype=torch.long))


@pytest.mark.parametrize("mode", ["fast", "fast-static", "low-memory"])
def test_build_engine_wires_the_new_modes_and_knobs(tiny_checkpoint, mode):
    from llm.engine import SamplingParams
    from llm.loading import build_engine
    from llm.serving.batching import BatchingEngine

    knobs = {"paged_kv": mode == "fast", "kv_cache_tokens": 200, "kv_block_size": 16} if mode != "low-memory" else {}
    engine = build_engine(
        mode.removesuffix("-static"), str(tiny_checkpoint.base_dir), str(tiny_checkpoint.adapter_dir), "cpu",
        max_batch=3, max_seq_len=128, max_queue=5, cuda_graphs=True, compile_kernels=True, **knobs,
    )
    try:
        assert isinstance(engine, BatchingEngine) and engine.name == mode.removesuffix("-static")
        assert engine.scheduler.model.max_batch == 3 and engine.scheduler.model.max_seq_len == 128
        assert engine.scheduler.max_queue == 5
        assert engine.info["cuda_graphs"] is False  # no CUDA here: eager steps, same scheduler
        assert engine.info["programmatic_launch"] is False
        assert engine.info["kv_paged"] is (mode == "fast")
        if mode == "fast":
            assert engine.info["kv_block_size"] == 16 and engine.info["kv_cache_tokens"] == 208  # whole blocks
            assert engine.info["paged_attention"] == "torch-gather"  # no CUDA here
        prompt = engine.tokenizer("코스피").input_ids
        text = engine.generate(prompt, SamplingParams(max_new_tokens=8, seed=3))
        assert isinstance(text, str) and "\ufffd" not in text
        # the per-request seed reaches the built engine: same seed, same text; another seed, another
        assert engine.generate(prompt, SamplingParams(max_new_tokens=8, seed=3)) == text
        assert engine.generate(prompt, SamplingParams(max_new_tokens=8, seed=4)) != text
    finally:
        engine.close()


def cached_kv(decoder, slot: int, length: int) -> torch.Tensor:  # noqa: ANN001 - a MistralDecoder
    """K and V of positions 0..length-1 of `slot` in every layer, [layers, 2, K, length, D]."""
    cfg = decoder.config
    layers = []
    for cache_k, cache_v in zip(decoder.k_cache, decoder.v_cache, strict=True):
        pair = []
        for cache in (cache_k, cache_v):
            if decoder.kv is None:
                pair.append(cache[slot, :, :length])
            else:
                pages = cache[decoder.kv.blocks[slot]].transpose(0, 1).reshape(cfg.num_kv_heads, -1, cfg.head_dim)
                pair.append(pages[:, :length])
        layers.append(torch.stack(pair))
    return torch.stack(layers).clone()


@pytest.mark.parametrize("kv_cache_tokens", [None, 512], ids=["static", "paged"])
def test_prefill_many_equals_one_by_one(reference_model, korean_ids, kv_cache_tokens):
    """Prompts prefilled together give each prompt's own logits and KV cache rows."""
    decoder = build_merged_decoder(reference_model, max_batch=3, max_seq_len=256, dtype=torch.float32,
                                   kv_cache_tokens=kv_cache_tokens, kv_block_size=16)
    prompts = [torch.tensor(korean_ids[:n]) for n in (len(korean_ids), 5, 17)]
    expected = [decoder.prefill(slot, p) for slot, p in enumerate(prompts)]
    expected_kv = [cached_kv(decoder, slot, len(p)) for slot, p in enumerate(prompts)]
    for cache in decoder.k_cache + decoder.v_cache:
        cache.zero_()
    got = decoder.prefill_many([2, 0, 1], [prompts[2], prompts[0], prompts[1]])
    torch.testing.assert_close(got, torch.stack([expected[2], expected[0], expected[1]]), atol=1e-4, rtol=1e-4)
    for slot, prompt in enumerate(prompts):  # (past each prompt the padding's K/V may lie: never read)
        torch.testing.assert_close(cached_kv(decoder, slot, len(prompt)), expected_kv[slot], atol=1e-5, rtol=1e-5)


def test_prefill_padded_to_a_bucket_gives_the_prompts_own_logits(reference_model, korean_ids):
    """`pad_to` (how the fidelity bench runs a prompt as its prefill bucket would): the prompt's
    logits at every position are its own, and the forward really ran over the padded length."""
    decoder = build_merged_decoder(reference_model, max_batch=1, max_seq_len=256, dtype=torch.float32)
    prompt = torch.tensor(korean_ids[:17])
    expected = decoder.prefill_many([0], [prompt], all_logits=True)
    for cache in decoder.k_cache:
        cache.zero_()
    got = decoder.prefill_many([0], [prompt], all_logits=True, pad_to=32)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert decoder.k_cache[0][0, :, 17:32].abs().sum() > 0  # the padding's K/V were computed too


def test_scheduler_prefills_queued_arrivals_together(reference_model, korean_ids, mistral_tokenizer):
    """Requests queued while the worker is busy are prefilled in one batch and decode as they
    would alone (greedy: identical tokens)."""
    from llm.engine import SamplingParams
    from llm.serving.batching import BatchingEngine, DecoderStepModel

    decoder = build_merged_decoder(reference_model, max_batch=4, max_seq_len=256, dtype=torch.float32)
    model = DecoderStepModel(DecodeGraphs(decoder, use_graphs=False))
    calls: list[int] = []
    original = model.prefill_many
    model.prefill_many = lambda slots, prompts: calls.append(len(slots)) or original(slots, prompts)
    engine = BatchingEngine(model, mistral_tokenizer, name="t")
    params = SamplingParams(greedy=True, max_new_tokens=6)
    prompts = [korean_ids[:n] for n in (9, 14, 21)]
    try:
        alone = [list(engine.stream_tokens(p, params, ignore_eos=True)) for p in prompts]
        with engine.scheduler._wake:  # hold the worker so all three queue up
            requests = [engine.scheduler.submit(p, params, ignore_eos=True) for p in prompts]
        together = [list(engine.scheduler.tokens(r)) for r in requests]
    finally:
        engine.close()
    assert together == alone
    assert 3 in calls, calls


def test_compiled_decode_pieces_compute_eager_pytorchs_values(reference_model):
    """Inductor fuses the decode step's norms, rotary and SiLU; left to itself it drops the bf16
    roundings between their ops (a quarter of the outputs move by a rounding step), so the
    decoder asks it to keep them: the fused pieces give eager PyTorch's (HF's) values exactly."""
    from llm.serving import mistral_decoder as md

    decoder = build_merged_decoder(reference_model, max_batch=2, max_seq_len=64)
    decoder.enable_compiled_kernels()
    g = torch.Generator().manual_seed(5)
    h, delta = (torch.randn(4, 256, generator=g).to(torch.bfloat16) for _ in range(2))
    weight = (torch.rand(256, generator=g) + 0.5).to(torch.bfloat16)
    qkv = torch.randn(4, 8 * 32, generator=g).to(torch.bfloat16)  # 4 heads and 2 + 2 KV heads of 32
    angles = torch.arange(16, dtype=torch.float32)[:, None] * torch.rand(16, generator=g)[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos().to(torch.bfloat16), torch.cat((angles, angles), -1).sin().to(
        torch.bfloat16)
    positions = torch.tensor([0, 3, 9, 15])
    gate_up = torch.randn(4, 512, generator=g).to(torch.bfloat16)
    pairs = [
        (decoder._norm(h, weight, 1e-5), md._rms_norm(h, weight, 1e-5)),
        (decoder._add_norm(h, delta, weight, 1e-5)[1], md._add_rms_norm(h, delta, weight, 1e-5)[1]),
        (decoder._silu_mul(gate_up), md._silu_mul(gate_up)),
        (decoder._rope(qkv, cos, sin, positions, 4, 2, 32)[0], md._rope_decode(qkv, cos, sin, positions, 4, 2, 32)[0]),
    ]
    for fused, eager in pairs:
        assert torch.equal(fused, eager)


def test_chunked_prefill_rows_equal_one_pass(reference_model):
    """Prefill runs norms/projections/MLP in row chunks (memory); the function is unchanged."""
    decoder = build_merged_decoder(reference_model, max_batch=2, max_seq_len=1200, dtype=torch.float32,
                                   kv_cache_tokens=2400, kv_block_size=16)
    ids = torch.randint(3, 30000, (1100,), generator=torch.Generator().manual_seed(0))
    chunked = decoder.prefill(0, ids, all_logits=True)
    decoder.prefill_chunk = 4096
    whole = decoder.prefill(1, ids, all_logits=True)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decoder.k_cache[0][decoder.kv.blocks[0]], decoder.k_cache[0][decoder.kv.blocks[1]])


@pytest.mark.parametrize("kv_cache_tokens", [None, 512], ids=["static", "paged"])
def test_bucketed_prefill_equals_exact_prefill(reference_model, korean_ids, kv_cache_tokens):
    """The padded prefill the CUDA graphs replay gives each prompt the logits and KV cache rows of
    an exact-length prefill, groups prompts into buckets within the token budget, and its padding
    never reaches a real slot's cache (only positions past each prompt, or scratch)."""
    decoder = build_merged_decoder(reference_model, max_batch=4, max_seq_len=256, dtype=torch.float32,
                                   kv_cache_tokens=kv_cache_tokens, kv_block_size=16)
    exact = DecodeGraphs(decoder, use_graphs=False)
    bucketed = DecodeGraphs(decoder, use_graphs=False, bucketed_prefill=True, prefill_token_budget=128)
    assert bucketed.prefill_lengths == [32, 64, 128, 256]
    assert (2, 64) in bucketed.prefill_shapes() and (4, 64) not in bucketed.prefill_shapes()
    lengths = (20, 5, 30, 40)  # three fit (4, 32); with the fourth they would need (4, 64) > 128
    prompts = [torch.tensor((korean_ids * 3)[:n]) for n in lengths]
    slots = [3, 0, 2, 1]
    calls: list[tuple[int, int]] = []
    padded = decoder.prefill_padded
    decoder.prefill_padded = lambda ids, last, dest: calls.append(tuple(ids.shape)) or padded(ids, last, dest)

    expected = exact.prefill_many(slots, prompts)
    expected_kv = [cached_kv(decoder, slot, n) for slot, n in zip(slots, lengths, strict=True)]
    for cache in decoder.k_cache + decoder.v_cache:
        cache.zero_()
    for slot in slots:
        decoder.kv_release(slot)
    got = bucketed.prefill_many(slots, prompts)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert calls == [(4, 32), (1, 64)]
    for slot, n, kv in zip(slots, lengths, expected_kv, strict=True):
        torch.testing.assert_close(cached_kv(decoder, slot, n), kv, atol=1e-5, rtol=1e-5)
    if decoder.kv is None:  # padding rows went to the scratch row, never to a free slot
        assert decoder.k_cache[0][decoder.scratch_slot].abs().sum() > 0
    # a prompt longer than the budget's largest single bucket is prefilled exactly (eagerly)
    calls.clear()
    long_prompt = torch.tensor((korean_ids * 20)[:200])
    torch.testing.assert_close(
        bucketed.prefill_many([0], [long_prompt]), exact.prefill_many([1], [long_prompt]), atol=1e-4, rtol=1e-4
    )
    assert calls == []


def test_batching_engine_reports_why_each_answer_stopped(reference_model, mistral_tokenizer, korean_ids):
    """eos when the model ended it, length at max_new_tokens or at the end of the KV cache,
    cancelled on the caller's event: the fast/low-memory engines tell the cleaning step whether an
    answer may end mid-sentence."""
    import threading

    from llm.engine import SamplingParams
    from llm.serving.batching import BatchingEngine, DecoderStepModel

    decoder = build_merged_decoder(reference_model, max_batch=2, max_seq_len=64, dtype=torch.float32)
    engine = BatchingEngine(DecoderStepModel(DecodeGraphs(decoder, use_graphs=False)), mistral_tokenizer, name="t")
    greedy = SamplingParams(greedy=True, max_new_tokens=8)
    prompt = korean_ids[:10]
    try:
        forced = list(engine.stream_tokens(prompt, greedy, ignore_eos=True))
        assert mistral_tokenizer.eos_token_id not in forced  # random weights: no EOS this early

        cut = engine.stream(prompt, greedy)
        assert "".join(cut) and cut.finish_reason == "length"

        long_prompt = (korean_ids * 3)[:60]  # 4 positions left in the 64-token cache
        cache_end = engine.stream(long_prompt, SamplingParams(greedy=True, max_new_tokens=50))
        assert "".join(cache_end) and cache_end.finish_reason == "length"

        engine.scheduler.eos_token_id = forced[3]  # the 4th greedy token now ends the answer
        ended = engine.stream(prompt, greedy)
        assert "".join(ended) == mistral_tokenizer.decode(forced[:3]) and ended.finish_reason == "eos"

        cancel = threading.Event()
        cancelled = engine.stream(prompt, SamplingParams(greedy=True, max_new_tokens=50), cancel)
        cancel.set()
        assert list(cancelled) == [] and cancelled.finish_reason == "cancelled"
    finally:
        engine.close()
