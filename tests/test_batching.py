"""The continuous-batching scheduler with the tiny model on the CPU, and its sampler."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llm.engine import SamplingParams
from llm.errors import EngineBusyError, GenerationError
from llm.loading import load_reference_model, load_tokenizer
from llm.serving.batching import BatchingEngine, DecoderStepModel, sample_next
from llm.serving.fast import build_merged_decoder
from llm.serving.mistral_decoder import DecodeGraphs

GREEDY = SamplingParams(greedy=True, max_new_tokens=24)


class RecordingModel:
    """Wraps a StepModel: records batch sizes, and can fail on demand."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.max_batch, self.max_seq_len = inner.max_batch, inner.max_seq_len
        self.decode_sizes: list[int] = []
        self.fail_prefill_on: int | None = None  # a token id that makes prefill fail
        self.fail_next_decode = False
        self.prefill_gate: threading.Event | None = None
        self.decode_delay = 0.0  # seconds per decode step: a slow model, so a run-away request shows

    def prefill(self, slot, prompt_ids):
        if self.prefill_gate is not None:
            self.prefill_gate.wait(10)
        if self.fail_prefill_on is not None and self.fail_prefill_on in prompt_ids:
            raise RuntimeError("injected prefill fault")
        return self.inner.prefill(slot, prompt_ids)

    def decode(self, tokens, positions):
        if self.fail_next_decode:
            self.fail_next_decode = False
            raise RuntimeError("injected decode fault")
        self.decode_sizes.append(sum(1 for p in positions if p > 0))
        if self.decode_delay:
            time.sleep(self.decode_delay)
        return self.inner.decode(tokens, positions)

    def close(self):
        self.inner.close()

    def __getattr__(self, name):  # kv_paged, kv_reserve, ... of the wrapped model (not prefill_many)
        if name.startswith("kv_"):
            return getattr(self.inner, name)
        raise AttributeError(name)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model = load_reference_model(str(tiny_checkpoint.base_dir), str(tiny_checkpoint.adapter_dir), "cpu")
    return model, load_tokenizer(str(tiny_checkpoint.base_dir))


def make_engine(tiny, max_batch=4, max_queue=8, kv_cache_tokens=None):
    model, tokenizer = tiny
    decoder = build_merged_decoder(model, max_batch=max_batch, max_seq_len=256, dtype=torch.float32,
                                   kv_cache_tokens=kv_cache_tokens, kv_block_size=16)
    recording = RecordingModel(DecoderStepModel(DecodeGraphs(decoder, use_graphs=False)))
    return BatchingEngine(recording, tokenizer, name="test", max_queue=max_queue), recording


def prompts(tokenizer, n):
    texts = ["코스피 전망은?", "금리가 오르면 채권 가격은?", "환율 1,400원의 의미", "ETF와 펀드의 차이",
             "배당주 투자 방법", "인플레이션이란?", "GDP 성장률", "적금과 예금"]
    return [tokenizer(texts[i % len(texts)]).input_ids for i in range(n)]


def run_alone(engine, prompt, params=GREEDY):
    return list(engine.stream_tokens(prompt, params, ignore_eos=True))


def test_concurrent_requests_all_complete_and_join_the_running_batch(tiny):
    engine, recording = make_engine(tiny, max_batch=4)
    try:
        tokenizer = engine.tokenizer
        ps = prompts(tokenizer, 6)
        alone = [run_alone(engine, p) for p in ps]
        recording.decode_sizes.clear()
        results: dict[int, list[int]] = {}

        def worker(i):
            results[i] = run_alone(engine, ps[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
            time.sleep(0.01)
        for thread in threads:
            thread.join(60)
        assert sorted(results) == list(range(6))
        for i in range(6):
            assert len(results[i]) == GREEDY.max_new_tokens
            assert results[i] == alone[i], f"request {i} changed when batched"
        # requests that arrived while others ran were decoded together with them
        assert max(recording.decode_sizes) > 1
        assert engine.scheduler.active == 0
    finally:
        engine.close()


def _run_concurrently(engine, ps, params):
    results: dict[int, list[int]] = {}

    def worker(i):
        results[i] = list(engine.stream_tokens(ps[i], params, ignore_eos=True))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(ps))]
    for thread in threads:
        thread.start()
        time.sleep(0.005)
    for thread in threads:
        thread.join(120)
    return results


def test_paged_cache_preempts_the_youngest_and_resumes_it_unchanged(tiny):
    """A 256-token pool for 4 requests that grow to ~90 tokens each: requests must be preempted
    (blocks freed, re-prefilled with their emitted tokens later) and every stream still equals
    the request decoded alone; all blocks are back in the pool at the end."""
    engine, recording = make_engine(tiny, max_batch=4, kv_cache_tokens=256)
    params = SamplingParams(greedy=True, max_new_tokens=80)
    try:
        ps = prompts(engine.tokenizer, 4)
        alone = [run_alone(engine, p, params) for p in ps]
        assert engine.scheduler.preemptions == 0
        results = _run_concurrently(engine, ps, params)
        assert sorted(results) == [0, 1, 2, 3]
        for i in range(4):
            assert results[i] == alone[i], f"request {i} changed by preemption"
        assert engine.scheduler.preemptions > 0
        assert max(recording.decode_sizes) > 1
        assert recording.inner.kv_free_tokens() == 256 and engine.scheduler.active == 0
    finally:
        engine.close()


def test_preemption_evicts_the_youngest_request_and_the_oldest_streams_on(tiny):
    """Two requests outgrow a 256-token pool together: the one admitted last is paused (preempted)
    and resumed later; the one that has been answering longest is never interrupted."""
    engine, _ = make_engine(tiny, max_batch=2, kv_cache_tokens=256)
    params = SamplingParams(greedy=True, max_new_tokens=150)  # ~160 tokens = 10 blocks each, 16 in the pool
    try:
        older_prompt, younger_prompt = prompts(engine.tokenizer, 2)
        with engine.scheduler._wake:  # hold the worker: both are admitted in one go, in this order
            older = engine.scheduler.submit(older_prompt, params, ignore_eos=True)
            younger = engine.scheduler.submit(younger_prompt, params, ignore_eos=True)
        older_tokens = list(engine.scheduler.tokens(older))
        younger_tokens = list(engine.scheduler.tokens(younger))
        assert len(older_tokens) == len(younger_tokens) == 150
        assert engine.scheduler.preemptions >= 1
        assert older.preempted == 0, f"the oldest request was preempted {older.preempted} time(s)"
        assert younger.preempted >= 1
    finally:
        engine.close()


def test_paged_admission_keeps_a_block_of_growth_headroom_per_running_request(tiny):
    """A prompt that would take the pool's last free blocks waits while another request runs:
    admitting it would leave the running request no block to grow into and force a preemption
    (a whole prompt recomputed) a few tokens later."""
    engine, recording = make_engine(tiny, max_batch=2, kv_cache_tokens=256)
    params = SamplingParams(greedy=True, max_new_tokens=20)
    try:
        ids = engine.tokenizer("코스피 전망은? " * 40).input_ids
        running_prompt, newcomer_prompt = ids[:100], ids[:130]
        # 16 blocks of 16 tokens. The running request takes 7 (100 prompt + 1 decode position),
        # leaving 9 = 144 tokens: room for the newcomer's 131, not for 131 + one block of headroom.
        with engine.scheduler._wake:
            running = engine.scheduler.submit(running_prompt, params, ignore_eos=True)
            newcomer = engine.scheduler.submit(newcomer_prompt, params, ignore_eos=True)
        assert len(list(engine.scheduler.tokens(running))) == 20
        assert len(list(engine.scheduler.tokens(newcomer))) == 20
        preemptions = engine.scheduler.preemptions
        assert preemptions == 0, f"admitting the newcomer forced {preemptions} preemption(s)"
        assert max(recording.decode_sizes) == 1  # the newcomer waited instead of joining
        assert recording.inner.kv_free_tokens() == 256
    finally:
        engine.close()


def test_a_per_request_seed_gives_the_same_text_alone_and_batched(tiny):
    """SamplingParams.seed: the same seed samples the same text, whether the request runs alone or
    in a batch with other sampled requests; another seed samples another text."""
    engine, _ = make_engine(tiny, max_batch=4)
    seeded = SamplingParams(max_new_tokens=24, seed=7)
    try:
        p, *others = prompts(engine.tokenizer, 3)
        alone = engine.generate(p, seeded)
        assert engine.generate(p, seeded) == alone
        assert engine.generate(p, SamplingParams(max_new_tokens=24, seed=8)) != alone
        with engine.scheduler._wake:  # decoded together, the others drawing random numbers too
            requests = [
                engine.scheduler.submit(others[0], SamplingParams(max_new_tokens=24)),
                engine.scheduler.submit(p, seeded),
                engine.scheduler.submit(others[1], SamplingParams(max_new_tokens=24, seed=99)),
            ]
        batched = [engine.tokenizer.decode(list(engine.scheduler.tokens(r))) for r in requests]
        assert batched[1] == alone
    finally:
        engine.close()


def test_paged_cache_keeps_a_prompt_waiting_until_blocks_free(tiny):
    """Two 200-token prompts in a 256-token pool: the second waits in the queue (no preemption
    needed, never decoded together) and both complete."""
    engine, recording = make_engine(tiny, max_batch=4, kv_cache_tokens=256)
    params = SamplingParams(greedy=True, max_new_tokens=20)
    try:
        base = engine.tokenizer("코스피 전망은? " * 40).input_ids[:200]
        ps = [base, [*base[:199], 1234]]
        alone = [run_alone(engine, p, params) for p in ps]
        recording.decode_sizes.clear()
        results = _run_concurrently(engine, ps, params)
        assert [results[0], results[1]] == alone
        assert max(recording.decode_sizes) == 1 and engine.scheduler.preemptions == 0
    finally:
        engine.close()


def test_cancel_event_stops_one_request_only(tiny):
    engine, _ = make_engine(tiny)
    try:
        ps = prompts(engine.tokenizer, 3)
        long = SamplingParams(greedy=True, max_new_tokens=150)
        cancel = threading.Event()
        results: dict[int, list[int]] = {}

        def worker(i):
            got = []
            for token in engine.stream_tokens(ps[i], long, cancel=cancel if i == 1 else None, ignore_eos=True):
                got.append(token)
                if i == 1 and len(got) == 5:
                    cancel.set()
            results[i] = got

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results[0]) == 150 and len(results[2]) == 150
        assert 5 <= len(results[1]) < 150
    finally:
        engine.close()


def test_consumer_that_stops_iterating_frees_its_slot(tiny):
    """A consumer that walks away (a Slack reply abandoned mid-stream) cancels its request: the
    scheduler stops stepping it within a few steps, long before max_new_tokens, and frees the slot."""
    engine, recording = make_engine(tiny, max_batch=1)
    recording.decode_delay = 0.02  # running on to max_new_tokens would take 4 s more
    try:
        p = prompts(engine.tokenizer, 1)[0]
        steps_before = engine.scheduler.steps
        stream = engine.stream(p, SamplingParams(max_new_tokens=200, seed=1))  # what the bot reads
        next(stream)
        stream.close()  # consumer walks away
        deadline = time.monotonic() + 10
        while engine.scheduler.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.scheduler.active == 0
        steps = engine.scheduler.steps - steps_before
        assert steps < 50, f"{steps} decode steps for a request whose consumer left after its first text (of 200)"
        time.sleep(0.1)
        assert engine.scheduler.steps - steps_before == steps  # nothing is stepped any more
        # the single slot is usable again
        recording.decode_delay = 0.0
        assert len(run_alone(engine, p)) == GREEDY.max_new_tokens
    finally:
        engine.close()


def test_failing_request_does_not_kill_the_others(tiny):
    engine, recording = make_engine(tiny)
    try:
        ps = prompts(engine.tokenizer, 3)
        poison = 31999
        recording.fail_prefill_on = poison
        ps[1] = [*ps[1], poison]
        outcomes: dict[int, object] = {}

        def worker(i):
            try:
                outcomes[i] = run_alone(engine, ps[i])
            except GenerationError as error:
                outcomes[i] = error

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert isinstance(outcomes[1], GenerationError)
        assert len(outcomes[0]) == len(outcomes[2]) == GREEDY.max_new_tokens
    finally:
        engine.close()


def test_failed_decode_step_fails_its_batch_but_engine_keeps_serving(tiny):
    engine, recording = make_engine(tiny)
    try:
        p = prompts(engine.tokenizer, 1)[0]
        recording.fail_next_decode = True
        with pytest.raises(GenerationError):
            run_alone(engine, p)
        assert len(run_alone(engine, p)) == GREEDY.max_new_tokens
    finally:
        engine.close()


def test_full_queue_raises_engine_busy(tiny):
    engine, recording = make_engine(tiny, max_batch=1, max_queue=2)
    gate = threading.Event()
    recording.prefill_gate = gate
    try:
        p = prompts(engine.tokenizer, 1)[0]
        first = engine.scheduler.submit(p, GREEDY)  # taken by the worker, blocked in prefill
        deadline = time.monotonic() + 5
        while engine.scheduler.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = [engine.scheduler.submit(p, GREEDY) for _ in range(2)]
        with pytest.raises(EngineBusyError):
            engine.scheduler.submit(p, GREEDY)
        with pytest.raises(EngineBusyError):
            next(engine.stream(p, GREEDY))
        gate.set()
        for request in [first, *queued]:
            assert len(list(engine.scheduler.tokens(request))) >= 1
    finally:
        gate.set()
        engine.close()


@pytest.mark.parametrize("kv_cache_tokens", [256, None], ids=["paged", "static"])
def test_stats_report_the_queue_the_running_requests_and_kv_cache_use(tiny, kv_cache_tokens):
    """What /metrics shows of the engine (finbot_engine_queue_depth, _running_requests, _kv_cache_*)."""
    engine, recording = make_engine(tiny, max_batch=1, max_queue=4, kv_cache_tokens=kv_cache_tokens)
    gate = threading.Event()
    recording.prefill_gate = gate
    try:
        idle = engine.stats()
        capacity = idle["kv_cache_capacity_tokens"]
        assert idle["queue_depth"] == 0 and idle["running_requests"] == 0 and idle["kv_cache_used_tokens"] == 0
        assert capacity == (256 if kv_cache_tokens else 1 * 256)  # the pool, or max_batch x max_seq_len
        p = prompts(engine.tokenizer, 1)[0]
        first = engine.scheduler.submit(p, GREEDY)  # admitted, then held in prefill
        queued = [engine.scheduler.submit(p, GREEDY) for _ in range(2)]
        deadline = time.monotonic() + 5
        while engine.stats()["running_requests"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = engine.stats()
        assert busy["queue_depth"] == 2 and busy["running_requests"] == 1
        if kv_cache_tokens:
            assert 0 < busy["kv_cache_used_tokens"] <= capacity  # blocks reserved at admission
        gate.set()
        for request in [first, *queued]:
            list(engine.scheduler.tokens(request))
        deadline = time.monotonic() + 5
        while engine.stats()["running_requests"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats() == idle
    finally:
        gate.set()
        engine.close()


def test_eos_ends_a_request_and_is_not_emitted(tiny):
    engine, _ = make_engine(tiny)
    try:
        p = prompts(engine.tokenizer, 1)[0]
        forced = run_alone(engine, p, SamplingParams(greedy=True, max_new_tokens=10))
        # make the 4th greedy token the EOS id: the stream must stop before it
        engine.scheduler.eos_token_id = forced[3]
        got = list(engine.stream_tokens(p, SamplingParams(greedy=True, max_new_tokens=10)))
        assert got == forced[:3]
    finally:
        engine.close()


def test_sampler_respects_top_k_top_p_greedy_and_seed():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    top3 = set(logits[0].topk(3).indices.tolist())
    params = [
        SamplingParams(top_k=3, top_p=1.0, temperature=1.0),
        SamplingParams(top_k=0, top_p=1e-6, temperature=0.9),  # top-p keeps only the best token
        SamplingParams(greedy=True),
        SamplingParams(top_k=50, top_p=0.8, temperature=0.9, seed=7),
    ]
    seen = set()
    for _ in range(200):
        out = sample_next(logits, params, [None, None, None, torch.Generator().manual_seed(7)])
        seen.add(out[0])
        assert out[1] == int(logits[1].argmax())
        assert out[2] == int(logits[2].argmax())
    assert seen <= top3 and len(seen) > 1
    a = [sample_next(logits[3:], params[3:], [torch.Generator().manual_seed(7)])[0] for _ in range(3)]
    assert len(set(a)) == 1  # a seeded request is reproducible
    with pytest.raises(ValueError):
        sample_next(logits[:1], [SamplingParams(temperature=0.0)], [None])


def test_sampler_matches_hf_warpers_distribution():
    """Kept set and probabilities equal HF's temperature -> top-k -> top-p processors."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(1)
    logits = torch.randn(1, 500) * 3
    scores = logits.clone()
    for warper in (TemperatureLogitsWarper(0.9), TopKLogitsWarper(50), TopPLogitsWarper(0.8)):
        scores = warper(None, scores)
    expected = torch.softmax(scores, dim=-1)[0]
    counts = torch.zeros(500)
    params = [SamplingParams()] * 256
    batch = logits.expand(256, -1).contiguous()
    for _ in range(40):
        for token in sample_next(batch, params, [None] * 256):
            counts[token] += 1
    assert set(counts.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    empirical = counts / counts.sum()
    assert (empirical - expected).abs().sum() < 0.08


@pytest.fixture
def _triton_sampler_on_the_cpu(monkeypatch):
    """`triton_sampling` as if it served here; its `draw` is what each test sets."""
    from llm.serving import triton_sampling

    monkeypatch.setattr(triton_sampling, "serves", lambda *_: triton_sampling._switched_off is None)
    yield triton_sampling
    triton_sampling.switch_off(None)


def test_a_failing_triton_sampler_costs_no_answer_and_stays_off(_triton_sampler_on_the_cpu, monkeypatch, caplog):
    calls = []

    def broken(*_):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")  # as a Triton that cannot compile the kernel says

    monkeypatch.setattr(_triton_sampler_on_the_cpu, "draw", broken)
    torch.manual_seed(0)
    logits = torch.randn(3, 1000)
    for _ in range(3):
        tokens = sample_next(logits, [SamplingParams(top_k=5)] * 3, [None] * 3)
        assert all(token in logits[row].topk(5).indices.tolist() for row, token in enumerate(tokens))
    assert len(calls) == 1  # switched off after the first failure
    assert caplog.text.count("Triton sampling switched off, PyTorch's sampler from now on: a draw failed") == 1


def test_the_start_up_check_switches_a_wrong_triton_sampler_off(_triton_sampler_on_the_cpu, monkeypatch, caplog):
    from llm.serving import batching

    def right(logits, temperature, top_p, top_k, greedy, u):  # PyTorch's draw from the same arguments
        settings = batching._RowSettings(temperature, top_p, top_k, greedy, int(top_k.max()), 0)
        return batching._pytorch_draw(logits, settings, u)

    monkeypatch.setattr(_triton_sampler_on_the_cpu, "HAS_TOPK", True)
    monkeypatch.setattr(_triton_sampler_on_the_cpu, "draw", right)
    assert batching.check_triton_sampling(torch.device("cpu"), 1000) == {
        "triton_sampling": True, "triton_sampling_agreement": 1.0, "triton_sampling_topk": True}
    monkeypatch.setattr(_triton_sampler_on_the_cpu, "draw", lambda logits, *_: logits.argmin(-1))
    info = batching.check_triton_sampling(torch.device("cpu"), 1000)
    assert info["triton_sampling"] is False and "of 256 rows" in info["triton_sampling_error"]
    assert caplog.text.count("its bitonic top-k failed") == 1  # the full sort was checked too, and failed too
    assert caplog.text.count("Triton sampling switched off, PyTorch's sampler from now on: the start-up check") == 1
    assert _triton_sampler_on_the_cpu._switched_off is not None


def test_the_sampling_settings_start_16_bytes_aligned_at_every_batch_size():
    """Triton compiles a kernel again for every alignment of its pointers it meets: the per-row settings
    must not change alignment with the batch size (run 42: unpadded, they had 3 alignments)."""
    from llm.serving import batching

    for rows in range(1, 17):
        params = tuple(SamplingParams(temperature=0.5 + row / 10, top_k=row + 1) for row in range(rows))
        settings = batching._param_tensors(params, 1000, torch.device("cpu"))
        for values in (settings.temperature, settings.top_p, settings.top_k, settings.greedy):
            assert values.data_ptr() % 16 == 0 and values.shape == (rows,), rows
        assert settings.temperature.tolist() == pytest.approx([p.temperature for p in params])
        assert settings.top_k.tolist() == [p.top_k for p in params]


def test_a_triton_whose_top_k_fails_samples_with_the_full_sort(_triton_sampler_on_the_cpu, monkeypatch, caplog):
    """A Triton whose `tl.topk` cannot compile the sampler's keys: the start-up check falls back to the
    full sort, which draws PyTorch's tokens, and the Triton path stays on."""
    from llm.serving import batching

    def right_without_top_k(logits, temperature, top_p, top_k, greedy, u):
        if _triton_sampler_on_the_cpu.HAS_TOPK:
            raise RuntimeError("tt.topk: unsupported element type")
        settings = batching._RowSettings(temperature, top_p, top_k, greedy, int(top_k.max()), 0)
        return batching._pytorch_draw(logits, settings, u)

    monkeypatch.setattr(_triton_sampler_on_the_cpu, "HAS_TOPK", True)
    monkeypatch.setattr(_triton_sampler_on_the_cpu, "draw", right_without_top_k)
    info = batching.check_triton_sampling(torch.device("cpu"), 1000)
    assert info == {"triton_sampling": True, "triton_sampling_agreement": 1.0, "triton_sampling_topk": False}
    assert caplog.text.count("its bitonic top-k failed") == 1 and "switched off" not in caplog.text
    tokens = sample_next(torch.randn(3, 1000), [SamplingParams(top_k=5)] * 3, [None] * 3)
    assert len(tokens) == 3 and _triton_sampler_on_the_cpu._switched_off is None


def test_a_before_after_with_pytorchs_sampler_leaves_the_triton_paths_state_as_it_was():
    from llm.serving import triton_sampling

    with triton_sampling.pytorch_sampling("bench"):
        assert triton_sampling._switched_off == "bench"
    assert triton_sampling._switched_off is None
    triton_sampling.switch_off("the start-up check failed")
    try:
        with triton_sampling.pytorch_sampling("bench"):
            pass
        assert triton_sampling._switched_off == "the start-up check failed"  # not switched back on
    finally:
        triton_sampling.switch_off(None)
