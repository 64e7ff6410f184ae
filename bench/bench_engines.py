"""Benchmark the seed's path and finbot's engine modes on a random Mistral-7B (GPU, device tool).

Builds the model itself (exact Mistral-7B-v0.1 shape, bf16 weights drawn on the GPU), quantizes
it the way the seed's loader does (bnb NF4, double quant, bf16 compute), adds a random LoRA of the
seed's shape (r=32, alpha=8, attention + MLP + lm_head, float32 adapter weights as PEFT loads them),
then measures, in one process:

- seed-literal: the seed's code as written: the bf16 checkpoint saved, reloaded with
  `from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant, bf16 compute))`, the
  adapter saved and loaded with `PeftModel.from_pretrained`, HF generate of 256 forced tokens with
  the card's sampling, warm-up outside the timing, best of 2; every mode's ratio to it is printed;
- seed: the in-memory PeftModel through HF generate (64 tokens), the reference logits' source;
- nf4: the seed's NF4 bytes + unmerged LoRA under finbot's decoder and the fused NF4 kernels;
- low-memory: the same 4-bit PEFT modules under finbot's decoder and CUDA graphs;
- fast: dequantized + merged bf16 model under the same decoder.
Each mode gets a fresh build of the same random model (same seed, ~3 s): `nf4` and `fast` consume it.

Per case: single-stream tok/s (256 forced new tokens), 16 staggered concurrent requests (total
tok/s, per-request latency p50/p95), time to first token for a 1,500-token prompt, peak GPU
memory, start-up time incl. warm-up; fidelity (KL vs the seed path) over a Korean paragraph.
One JSON object per case on stdout (and in --out), a table last.

    python bench/bench_engines.py --commit $(git rev-parse HEAD) --tokenizer-file .tok/tokenizer.model.v1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llm.engine import SamplingParams  # noqa: E402
from llm.serving import programmatic_launch  # noqa: E402

SAMPLING = SamplingParams(temperature=0.9, top_p=0.8, top_k=50, max_new_tokens=256)
RESULTS: list[dict] = []


def emit(case: dict, out_dir: Path | None) -> None:
    RESULTS.append(case)
    print("RESULT " + json.dumps(case), flush=True)
    if out_dir is not None:
        (out_dir / "cases.jsonl").open("a").write(json.dumps(case) + "\n")


def gb(n: float) -> float:
    return round(n / 1e9, 2)


def sync() -> None:
    torch.cuda.synchronize()


def make_tokenizer(tokenizer_file: str | None, directory: Path):  # noqa: ANN201
    from transformers import AutoTokenizer

    from llm.synthetic import write_mistral_tokenizer

    write_mistral_tokenizer(directory, Path(tokenizer_file) if tokenizer_file else None)
    return AutoTokenizer.from_pretrained(directory)


def reference_path_prefill_kl(decoder, token_ids: list[int], reference_logits: torch.Tensor) -> dict:  # noqa: ANN001
    """KL of `nf4`'s prompt through its reference path (kernels off for the call, then as they were)."""
    from llm.fidelity import kl_summary
    from llm.serving import nf4 as nf4_mode

    projections = [p for layer in decoder.layers for p in layer.projections.values()]
    served = [p.use_kernels for p in projections]
    nf4_mode.disable_nf4_kernels(decoder)
    try:
        return kl_summary(reference_logits, decoder.prefill(0, torch.tensor(token_ids), all_logits=True))
    finally:
        for projection, use_kernels in zip(projections, served, strict=True):
            projection.use_kernels = use_kernels


def build_seed_model(seed: int = 0):  # noqa: ANN201
    """Random 7B in bf16 on the GPU -> bnb NF4 (double quant) in place -> random LoRA (PeftModel)."""
    import bitsandbytes as bnb
    from transformers import MistralForCausalLM

    from llm.synthetic import add_random_lora, mistral_7b_config

    torch.manual_seed(seed)
    config = mistral_7b_config()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda:0"):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False,
                    compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True,
                    quant_type="nf4", module=q,
                ).to("cuda:0")  # quantizes, exactly as from_pretrained's bnb path does
                setattr(parent, name, q)
                del child
    model.is_loaded_in_4bit = True
    torch.cuda.empty_cache()
    peft_model = add_random_lora(model, std=0.02)
    peft_model.requires_grad_(False)
    peft_model.eval()
    return peft_model


@torch.inference_mode()
def seed_decode_logits(model, token_ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    """The seed's own teacher-forced decode: HF's forward with its KV cache, one token at a time, as
    `generate` runs it. One row at a time takes bitsandbytes' `gemv_4bit` (bf16 products), not the
    dequantize-and-multiply its prompt forward takes, so these logits are not the prefill's."""
    ids = torch.tensor([token_ids], device="cuda:0")
    out = model(input_ids=ids[:, :1], use_cache=True)
    rows = [out.logits[0, -1].float().cpu()]
    past = out.past_key_values
    for position in range(1, len(token_ids)):
        out = model(input_ids=ids[:, position:position + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        rows.append(out.logits[0, -1].float().cpu())
    return torch.stack(rows)


def random_prompt(tokenizer, length: int, generator: torch.Generator) -> list[int]:  # noqa: ANN001
    body = torch.randint(100, 31000, (length - 1,), generator=generator).tolist()
    return [tokenizer.bos_token_id, *body]


# --- measurements on a BatchingEngine ---------------------------------------------------------


def single_stream(engine, prompt: list[int], tokens: int) -> dict:  # noqa: ANN001
    params = SamplingParams(max_new_tokens=tokens)
    start = time.perf_counter()
    times = []
    for _ in engine.stream_tokens(prompt, params, ignore_eos=True):
        times.append(time.perf_counter())
    total = times[-1] - start
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {
        "new_tokens": len(times), "seconds": round(total, 3), "tok_s": round(len(times) / total, 1),
        "decode_tok_s": round(decode, 1), "ttft_ms": round((times[0] - start) * 1000, 1),
    }


def staggered_prompts(tokenizer, n: int, seed: int = 1) -> list[list[int]]:  # noqa: ANN001
    """The staggered load's prompts: n random prompts of 64-511 tokens."""
    generator = torch.Generator().manual_seed(seed)
    return [
        random_prompt(tokenizer, int(torch.randint(64, 512, (1,), generator=generator)), generator)
        for _ in range(n)
    ]


def staggered(engine, tokenizer, n: int, tokens: int, gap_s: float, seed: int = 1) -> dict:  # noqa: ANN001
    prompts = staggered_prompts(tokenizer, n, seed)
    latencies: list[float] = [0.0] * n
    counts = [0] * n
    ttfts = [0.0] * n
    errors: list[str] = []

    def worker(i: int) -> None:
        started = time.perf_counter()
        try:
            for _ in engine.stream_tokens(prompts[i], SamplingParams(max_new_tokens=tokens), ignore_eos=True):
                if counts[i] == 0:
                    ttfts[i] = time.perf_counter() - started
                counts[i] += 1
        except Exception as error:  # noqa: BLE001
            errors.append(repr(error))
        latencies[i] = time.perf_counter() - started

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    scheduler = engine.scheduler
    profile_before, steps_before = dict(scheduler.profile), scheduler.steps
    start = time.perf_counter()
    for thread in threads:
        thread.start()
        time.sleep(gap_s)
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "requests": n, "gap_s": gap_s, "new_tokens_each": tokens, "total_tokens": sum(counts),
        "wall_s": round(wall, 2), "total_tok_s": round(sum(counts) / wall, 1),
        "latency_p50_s": round(statistics.median(ordered), 2),
        "latency_p95_s": round(ordered[min(n - 1, int(round(0.95 * (n - 1))))], 2),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1), "latency_max_s": round(ordered[-1], 2),
        "errors": errors,
        # the scheduler thread's time: decode steps, prefills, and how long it waited on the GPU
        "scheduler": {"steps": scheduler.steps - steps_before, **{
            key: round(value - profile_before[key], 3) for key, value in scheduler.profile.items()
        }},
    }


def ttft(engine, prompt: list[int], repeats: int = 3) -> float:  # noqa: ANN001
    """Median over prompts of 1500, 1501, ... tokens (a new length each: no per-shape caching)."""
    values = []
    for extra in range(repeats):
        start = time.perf_counter()
        ids = prompt + prompt[1 : 1 + extra]
        next(iter(engine.stream_tokens(ids, SamplingParams(max_new_tokens=1), ignore_eos=True)))
        values.append(time.perf_counter() - start)
    return round(statistics.median(values) * 1000, 1)


def mean_ms(run, repeats: int, warmup: int = 1) -> float:  # noqa: ANN001
    """Milliseconds per call of `run` (GPU work included): the mean of `repeats` calls after a warm-up."""
    for _ in range(warmup):
        run()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    sync()
    return round((time.perf_counter() - start) / repeats * 1000, 3)


def guarded(measure: Callable[[], dict]) -> dict:
    """`measure()`, or {"error": ...} where it raised: a profile, or a measurement that has not run on a GPU
    yet, must not cost the case its other figures."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001
        return {"error": repr(error)}


def sampler_gpu_us(vocab: int, calls: int = 200) -> dict:
    """GPU microseconds of one `sample_tokens` call (the seed's settings) at 1 and 16 rows, Triton and
    PyTorch: the calls are queued behind a sleeping kernel, so the host's launch time is not counted."""
    from llm.serving import triton_sampling
    from llm.serving.batching import sample_tokens

    out: dict = {"triton_serves": triton_sampling.serves(torch.device("cuda"), vocab, 50)}
    for rows in (1, 16):
        logits = torch.randn(rows, vocab, device="cuda") * 3
        params, generators = [SamplingParams()] * rows, [None] * rows
        for label, context in (("triton", contextlib.nullcontext()),
                               ("pytorch", triton_sampling.pytorch_sampling("bench: PyTorch's sampler timed"))):
            with context:
                for _ in range(3):
                    sample_tokens(logits, params, generators)
                sync()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(200_000_000)  # ~0.1 s: the host queues every call meanwhile
                start.record()
                for _ in range(calls):
                    sample_tokens(logits, params, generators)
                end.record()
                sync()
            out[f"{label}_rows{rows}"] = round(start.elapsed_time(end) * 1000 / calls, 1)
    return out


def _time_decode_ms(graphs, tokens: list[int], positions: list[int], warmup: int = 3, repeats: int = 20) -> float:  # noqa: ANN001
    """Milliseconds per graph-replayed decode step: the mean of `repeats` replays after a warm-up."""
    return mean_ms(lambda: graphs.decode(tokens, positions), repeats, warmup)


def graph_step_times(engine) -> dict:  # noqa: ANN001
    """Profile: pure decode step time (graph replay + logits to float) at a few buckets."""
    graphs = engine.scheduler.model.graphs
    decoder = graphs.decoder
    out = {}
    for n, kv in [(1, 256), (1, 2048), (16, 256), (16, 512), (16, 1024), (16, 2048)]:
        if n > graphs.max_batch or kv > graphs.max_seq_len:
            continue
        tokens, positions = [1] * n, [kv - 1] * n
        aliased = _profile_tables(decoder, n, kv)
        try:
            step_ms = _time_decode_ms(graphs, tokens, positions)
        finally:
            _clear_profile_tables(decoder, n)
        out[f"b{n}_kv{kv}_ms" + ("_aliased_blocks" if aliased else "")] = step_ms
    out.update(matmul_floor(decoder))
    if programmatic_launch.enabled(decoder.device):
        out.update(serial_step_times(decoder, graphs))
    plan, fused = decoder.gemm_plan, decoder.fused_rope_kv
    if (plan is not None or fused) and not decoder.paged:  # run 6's same-run cuBLAS baseline
        # Before/after in the same process: the same step with cuBLAS + PyTorch rope/KV writes.
        from llm.serving.mistral_decoder import DecodeGraphs

        decoder.disable_triton()
        try:
            out["cublas_b1_matmuls_only_ms"] = matmuls_only_ms(decoder, 1)
            base = DecodeGraphs(decoder, batch_buckets=[1, graphs.max_batch],
                                kv_buckets=[256, 512, 1024, graphs.max_seq_len])
            base.capture()
            for n, kv in [(1, 256), (1, 2048), (16, 512), (16, 1024), (16, 2048)]:
                if n > base.max_batch or kv > base.max_seq_len:
                    continue
                out[f"cublas_b{n}_kv{kv}_ms"] = _time_decode_ms(base, [1] * n, [kv - 1] * n)
            base._graphs.clear()  # not base.close(): that would free the shared decoder
        finally:
            decoder.fused_rope_kv = fused
            decoder.set_gemm_plan(plan)
    return out


@contextlib.contextmanager
def serial_launch_graphs(decoder, graphs) -> Iterator:  # noqa: ANN001
    """Decode graphs (1 row and `max_batch` rows) captured with plain launches
    (`programmatic_launch.serial_launches`): each of the step's own kernels waits for the one before
    it to finish before it starts. Released on exit, the shared decoder kept."""
    from llm.serving.mistral_decoder import DecodeGraphs

    with programmatic_launch.serial_launches():
        base = DecodeGraphs(decoder, batch_buckets=[1, graphs.max_batch], kv_buckets=[256, graphs.max_seq_len])
        base.capture()
    try:
        yield base
    finally:
        base._graphs.clear()  # not base.close(): that would free the shared decoder


def serial_step_times(decoder, graphs) -> dict:  # noqa: ANN001
    """The same steps with plain launches (`serial_launch_graphs`). Same process, same weights: the
    before / after of programmatic dependent launch. (Inductor's fused pieces were compiled with it
    and keep it.)"""
    with programmatic_launch.serial_launches():
        out = {"serial_b1_matmuls_only_ms": matmuls_only_ms(decoder, 1)}
    with serial_launch_graphs(decoder, graphs) as base:
        for n, kv in [(1, 256), (16, 256)]:
            if n > base.max_batch or kv > base.max_seq_len:
                continue
            _profile_tables(decoder, n, kv)
            try:
                out[f"serial_b{n}_kv{kv}_ms"] = _time_decode_ms(base, [1] * n, [kv - 1] * n)
            finally:
                _clear_profile_tables(decoder, n)
    return out


# What one decode step would take without a piece (its output replaced by its input): an upper bound
# on what fusing that piece away could save, with the step's launch order and overlaps as served.
STEP_WHATIFS = ("served", "no_rope_kv_write", "no_attention", "no_rope_kv_write_no_attention", "no_o")


@contextlib.contextmanager
def _step_variant(decoder, name: str) -> Iterator:  # noqa: ANN001
    from llm.serving import triton_kernels

    q_size = decoder.config.num_heads * decoder.config.head_dim
    patches = []
    if "no_rope_kv_write" in name:  # q unrotated, the new k/v not written (a copy only at >1 row)
        patches.append((triton_kernels, "rope_kv_write_paged", lambda qkv, *_, **__: qkv[:, :q_size].contiguous()))
    if "no_attention" in name:  # attention and its reduce: the output is q
        patches.append((triton_kernels, "paged_decode_attention", lambda q, *_, **__: q))
    if name == "no_o":
        patches.append((type(decoder.layers[0]), "o", lambda _layer, x: x))
    saved = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in patches]
    for owner, attribute, replacement in patches:
        setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        for owner, attribute, original in saved:
            setattr(owner, attribute, original)


def step_whatifs(decoder, graphs) -> dict:  # noqa: ANN001
    """Profile: the 1- and 16-row steps at a 256-token KV, captured afresh for each of `STEP_WHATIFS`
    (same process, same weights; "served" captured the same way), ms."""
    from llm.serving.mistral_decoder import DecodeGraphs

    out: dict = {}
    if not (decoder.paged and decoder.reads_real_lengths and graphs.use_graphs):
        return out  # the paged Triton attention in CUDA graphs: the serving configuration
    rows = sorted({1, graphs.max_batch})

    def timed(name: str) -> dict:
        with _step_variant(decoder, name):
            variant = DecodeGraphs(decoder, batch_buckets=rows, kv_buckets=[256, graphs.max_seq_len])
            variant.capture()
        times = {}
        try:
            for n in rows:
                _profile_tables(decoder, n, 256)
                try:
                    times[f"{name}_b{n}_kv256_ms"] = _time_decode_ms(variant, [1] * n, [255] * n)
                finally:
                    _clear_profile_tables(decoder, n)
        finally:
            variant._graphs.clear()  # not close(): that would free the shared decoder
        return times

    for name in STEP_WHATIFS:  # one variant that fails (never run on a GPU before) leaves the others
        found = guarded(lambda name=name: timed(name))
        out.update({f"{name}_error": found["error"]} if "error" in found else found)
    return out


def prefill_times(graphs, tokenizer) -> dict:  # noqa: ANN001
    """Profile: one prompt's prefill alone (median of 3, synchronised), outside the scheduler:
    `tN` as serving runs it (a captured bucket where one fits), `eager_tN` the eager exact-length
    forward, `rows4_t128` four 128-token prompts in one bucket."""
    generator = torch.Generator().manual_seed(5)
    decoder = graphs.decoder
    out = {}

    def timed(run) -> float:  # noqa: ANN001
        times = []
        for _ in range(4):
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
        return round(sorted(times[1:])[1] * 1000, 2)

    with torch.inference_mode():
        for length in (32, 288, 512, 1500):
            ids = torch.tensor(random_prompt(tokenizer, length, generator))
            out[f"t{length}"] = timed(lambda ids=ids: graphs.prefill_many([0], [ids]))
            out[f"eager_t{length}"] = timed(lambda ids=ids: decoder.prefill(0, ids))
        rows = min(4, graphs.max_batch)
        several = [torch.tensor(random_prompt(tokenizer, 128, generator)) for _ in range(rows)]
        out[f"rows{rows}_t128"] = timed(lambda: graphs.prefill_many(list(range(rows)), several))
    for slot in range(rows):
        decoder.kv_release(slot)
    return out


def _profile_tables(decoder, n: int, kv: int) -> bool:  # noqa: ANN001
    """Paged cache: give rows 0..n-1 block tables for kv tokens straight from the pool (timing
    only, content irrelevant), bypassing the allocator. Blocks repeat (aliased, so partly L2
    resident) when n x kv exceeds the pool. Returns whether they do."""
    kv_state = decoder.kv
    if kv_state is None:
        return False
    pages = -(-kv // kv_state.block_size)
    usable = kv_state.num_blocks - 1
    for row in range(n):
        decoder.kv_release(row)  # e.g. the fidelity prefill's blocks go back to the pool first
    for row in range(n):
        blocks = [1 + (row * pages + i) % usable for i in range(pages)]
        kv_state.blocks[row] = blocks
        kv_state.table[row].zero_()
        kv_state.table[row, :pages] = torch.tensor(blocks, dtype=torch.int32)
    return n * pages > usable


def _clear_profile_tables(decoder, n: int) -> None:  # noqa: ANN001
    if decoder.kv is not None:
        for row in range(n):
            decoder.kv.blocks[row] = []
            decoder.kv.table[row].zero_()


def matmuls_only_ms(decoder, rows: int) -> float | None:  # noqa: ANN001
    """Milliseconds of only the weight matmuls of one `rows`-row decode step (all layers + lm_head),
    replayed in a CUDA graph; None where the layers are not the serving ones or there is no GPU."""
    from llm.serving.mistral_decoder import DenseLayer
    from llm.serving.nf4 import NF4Layer

    if not isinstance(decoder.layers[0], DenseLayer | NF4Layer) or decoder.device.type != "cuda":
        return None
    layers = decoder.layers
    x = torch.randn(rows, decoder.config.hidden_size, dtype=decoder.dtype, device=decoder.device)
    xi = torch.randn(rows, decoder.config.intermediate_size, dtype=decoder.dtype, device=decoder.device)

    def run() -> torch.Tensor:
        acc = x
        for layer in layers:
            layer.qkv(x), layer.o(x), layer.gate_up(x)
            acc = layer.down(xi)
        return decoder.lm_head(acc)

    from llm.serving.triton_kernels import graph_time_ms

    with torch.inference_mode():
        return round(graph_time_ms(run, replays=20), 3)


def matmul_floor(decoder) -> dict:  # noqa: ANN001
    """Profile: only the weight matmuls of a 1-row and a 16-row decode step. The 1-row time over the
    step's time is what the non-matmul kernels cost; bytes/time is the achieved weight bandwidth."""
    from llm.serving.nf4 import NF4Layer

    one_row_ms = matmuls_only_ms(decoder, 1)
    if one_row_ms is None:
        return {}
    rows_16 = min(16, decoder.max_batch)
    layers = decoder.layers
    if isinstance(layers[0], NF4Layer):
        weight_bytes = sum(layer.nbytes for layer in layers) + decoder.lm_head.lora.nbytes
    else:
        weight_bytes = sum(
            t.numel() * t.element_size()
            for layer in layers for t in (layer.w_qkv, layer.w_o, layer.w_gate_up, layer.w_down)
        )
    # the lm_head's bf16 weight (the embedding is gathered, not streamed)
    weight_bytes += decoder.embed.numel() * decoder.embed.element_size()
    copy_src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_dst.copy_(copy_src)
    sync()
    start = time.perf_counter()
    for _ in range(5):
        copy_dst.copy_(copy_src)
    sync()
    copy_tb_s = 2 * copy_src.numel() * 5 / (time.perf_counter() - start) / 1e12
    del copy_src, copy_dst
    return {
        "b1_matmuls_only_ms": one_row_ms,
        f"b{rows_16}_matmuls_only_ms": matmuls_only_ms(decoder, rows_16),
        "weight_gb_per_token": round(weight_bytes / 1e9, 2),
        "matmul_achieved_tb_s": round(weight_bytes / (one_row_ms / 1000) / 1e12, 2),
        "copy_tb_s": round(copy_tb_s, 2),
        "bandwidth_floor_ms": round(weight_bytes / (copy_tb_s * 1e12) * 1000, 3),
    }


def profile_steps(engine, prompt: list[int], out_dir: Path | None) -> dict:  # noqa: ANN001
    """torch.profiler over 32 tokens of one stream: where the step time goes (GPU kernels vs host)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        list(engine.stream_tokens(prompt, SamplingParams(max_new_tokens=32), ignore_eos=True))
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    if out_dir is not None:
        (out_dir / f"profile_{engine.name}.txt").write_text(table)
    events = prof.key_averages()
    cuda_total = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1e3
    return {"profiled_tokens": 32, "gpu_kernel_ms_total": round(cuda_total, 1)}


def profile_decode_rows(engine, rows: int, out_dir: Path | None) -> dict:  # noqa: ANN001
    """torch.profiler over 20 replays of one `rows`-row decode step (KV 256), captured with plain
    launches so that each kernel's time is its own (with programmatic launch a kernel's time also
    covers its wait for the one before it). Writes profile_step<rows>_<name>.txt."""
    from torch.profiler import ProfilerActivity, profile

    graphs = engine.scheduler.model.graphs
    decoder = graphs.decoder
    with serial_launch_graphs(decoder, graphs) as base:
        _profile_tables(decoder, rows, 256)
        try:
            step = functools.partial(base.decode, [1] * rows, [255] * rows)
            mean_ms(step, repeats=5, warmup=3)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    step()
                sync()
        finally:
            _clear_profile_tables(decoder, rows)
    events = prof.key_averages()
    if out_dir is not None:
        table = events.table(sort_by="cuda_time_total", row_limit=40)
        (out_dir / f"profile_step{rows}_{engine.name}.txt").write_text(table)
    kernel_ms = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1e3
    return {"rows": rows, "profiled_steps": 20, "gpu_kernel_ms_per_step": round(kernel_ms / 20, 3)}


def profile_prefill(engine, prompt: list[int], out_dir: Path | None) -> dict:  # noqa: ANN001
    """torch.profiler over one long prompt's prefill and first token: where the TTFT goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        list(engine.stream_tokens(prompt, SamplingParams(max_new_tokens=1), ignore_eos=True))
    if out_dir is not None:
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        (out_dir / f"profile_prefill_{engine.name}.txt").write_text(table)
    events = prof.key_averages()
    return {"prompt_tokens": len(prompt),
            "gpu_kernel_ms_total": round(sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1e3, 1)}


def bench_batching_engine(name: str, build, tokenizer, args, reference_logits, korean_ids,  # noqa: ANN001
                          seed_decoded: torch.Tensor | None = None) -> dict:
    from llm.fidelity import kl_summary, teacher_forced_decode_logits

    case: dict = {"case": name}
    torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    engine = build()
    sync()
    case["startup_s"] = round(time.perf_counter() - start, 2)
    case["startup_peak_gb"] = gb(torch.cuda.max_memory_allocated())
    case["engine_info"] = engine.info
    decoder = engine.scheduler.model.decoder
    weight_bytes = sum(
        t.numel() * t.element_size()
        for layer in decoder.layers
        for t in (getattr(layer, name, None) for name in ("w_qkv", "w_o", "w_gate_up", "w_down"))
        if t is not None
    )
    head = getattr(decoder.lm_head, "weight", None)
    weight_bytes += sum(getattr(layer, "nbytes", 0) for layer in decoder.layers)  # nf4 layers
    head_lora = getattr(decoder.lm_head, "lora", None)
    weight_bytes += head_lora.nbytes if head_lora is not None else 0
    weight_bytes += decoder.embed.numel() * decoder.embed.element_size()
    weight_bytes += head.numel() * head.element_size() if head is not None else 0
    case["memory"] = {
        "weights_gb": gb(weight_bytes), "kv_cache_gb": gb(decoder.kv_cache_bytes),
        "allocated_after_startup_gb": gb(torch.cuda.memory_allocated()),
    }
    if name == "nf4":  # every kernel configuration the start-up tuner timed, not only the winners
        from llm.serving import nf4_kernels

        case["nf4_candidates_ms_per_step"] = dict(nf4_kernels.CANDIDATE_MS)
    try:
        step_model = engine.scheduler.model
        with torch.inference_mode():
            prefill_logits = step_model.decoder.prefill(0, torch.tensor(korean_ids), all_logits=True)
            case["fidelity_prefill"] = kl_summary(reference_logits, prefill_logits)
            del prefill_logits
            if name == "nf4":  # the reference path (no kernels): PEFT's products, the seed's function
                case["fidelity_prefill_reference_path"] = reference_path_prefill_kl(
                    step_model.decoder, korean_ids, reference_logits)
            bucket = step_model.graphs._prefill_bucket(1, len(korean_ids))
            if step_model.graphs.bucketed_prefill and bucket is not None:  # as serving pads it
                padded_logits = step_model.decoder.prefill_many(
                    [0], [torch.tensor(korean_ids)], all_logits=True, pad_to=bucket[1])
                case["fidelity_prefill_padded"] = {"length": bucket[1], **kl_summary(reference_logits, padded_logits)}
                del padded_logits
            decoded = teacher_forced_decode_logits(step_model, korean_ids)
            case["fidelity_decode"] = kl_summary(reference_logits, decoded)
            if seed_decoded is not None:  # against the seed's own decode (its gemv_4bit path)
                case["fidelity_decode_vs_seed_decode"] = kl_summary(seed_decoded, decoded)
            del decoded
        if args.fidelity_only:
            return case
        case["prefill_ms"] = prefill_times(step_model.graphs, tokenizer)
        case["step_profile"] = graph_step_times(engine)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # serving peak: without the profile's copy buffers
        generator = torch.Generator().manual_seed(0)
        short = random_prompt(tokenizer, 32, generator)
        single_stream(engine, short, 16)  # warm the Python side
        case["single"] = single_stream(
            engine, short, args.single_tokens if name in ("fast", "nf4") else args.low_tokens
        )
        if name in ("fast", "nf4"):  # the same stream with PyTorch's sampling kernels, same call
            from llm.serving import triton_sampling

            def pytorch_sampler_stream() -> dict:
                with triton_sampling.pytorch_sampling("bench: the same stream with PyTorch's sampler"):
                    return single_stream(engine, short, args.single_tokens)

            case["single_pytorch_sampler"] = guarded(pytorch_sampler_stream)
        case["profile"] = guarded(lambda: profile_steps(engine, short, args.out_dir))
        if args.profile_rows and programmatic_launch.enabled(step_model.decoder.device):
            case["step_rows_profile"] = guarded(lambda: profile_decode_rows(engine, args.profile_rows, args.out_dir))
        long_prompt = random_prompt(tokenizer, 1500, generator)
        case["ttft_1500_ms"] = ttft(engine, long_prompt)
        if name in ("fast", "nf4"):
            case["prefill_profile"] = guarded(lambda: profile_prefill(engine, long_prompt, args.out_dir))
        if name in ("fast", "nf4"):
            serving_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()  # peak while serving the 16 staggered requests
            case["staggered"] = staggered(engine, tokenizer, 16, 256, args.gap)
            case["memory"]["staggered_peak_gb"] = gb(torch.cuda.max_memory_allocated())
            case["memory"]["staggered_peak_reserved_gb"] = gb(torch.cuda.max_memory_reserved())
            case["staggered"]["preemptions"] = engine.scheduler.preemptions
            case["staggered_gap_100ms"] = staggered(engine, tokenizer, 16, 256, 0.1)
            case["staggered_gap_100ms"]["preemptions"] = engine.scheduler.preemptions
            torch.cuda.synchronize()
            case["memory"]["single_ttft_peak_gb"] = gb(serving_peak)
        else:
            case["staggered"] = staggered(engine, tokenizer, 4, 64, args.gap)
        # serving peak: max over the single stream, profile, TTFT and staggered phases
        case["serving_peak_gb"] = max(
            gb(torch.cuda.max_memory_allocated()), case["memory"].get("single_ttft_peak_gb", 0),
            case["memory"].get("staggered_peak_gb", 0),
        )
        case["serving_peak_reserved_gb"] = gb(torch.cuda.max_memory_reserved())
        case["resident_gb"] = gb(torch.cuda.memory_allocated())
        if name in ("fast", "nf4"):
            # Last, after the serving figures and the peaks: new code whose failure must not cost them.
            case["sampler_gpu_us"] = guarded(lambda: sampler_gpu_us(step_model.decoder.config.vocab_size))
            case["step_profile"]["whatif"] = guarded(lambda: step_whatifs(step_model.decoder, step_model.graphs))
    finally:
        engine.close()
        torch.cuda.empty_cache()
    return case


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--tokenizer-file", default=None)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--results", default=None, help="also write the results file here")
    parser.add_argument("--cases", default="seed-literal,seed,nf4,low-memory,fast")
    parser.add_argument("--seed-tokens", type=int, default=64)
    parser.add_argument("--single-tokens", type=int, default=256)
    parser.add_argument("--low-tokens", type=int, default=128)
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between staggered arrivals")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-triton", action="store_true", help="fast mode without the Triton kernels")
    parser.add_argument("--static-kv", action="store_true", help="fast mode with run 6's static KV cache")
    parser.add_argument("--paged-kv", action="store_true", help="fast mode with the paged KV cache (the default)")
    parser.add_argument("--profile-rows", type=int, default=0, metavar="ROWS",
                        help="fast/nf4: also profile one ROWS-row decode step kernel by kernel (plain launches)")
    parser.add_argument("--fidelity-only", action="store_true",
                        help="only the KL measurements (prefill, decode, and against the seed's own decode)")
    parser.add_argument("--kv-cache-tokens", type=int, default=None, help="fast: paged KV token budget")
    parser.add_argument("--xtab-layouts", default=None, metavar="LAYOUTS",
                        help="nf4: the one-row x-table layouts the tuner times, comma-separated (e.g. 16x1,8x1,8x2; "
                             "default: the served ones)")
    parser.add_argument("--fused-prompt-base", action="store_true",
                        help="nf4: serve the fused prompt base wherever its start-up plan finds cuBLAS's bits and a "
                             "faster kernel (the plans go to the case's engine_info)")
    args = parser.parse_args()
    if args.fused_prompt_base:
        from llm.serving import nf4_kernels

        nf4_kernels.SERVE_FUSED_PROMPT_BASE = True
    if args.xtab_layouts:
        from llm.serving import nf4_kernels, nf4_xtab

        try:
            nf4_kernels.time_xtab_layouts([nf4_xtab.XtabLayout.parse(item) for item in args.xtab_layouts.split(",")])
        except ValueError as error:
            parser.error(f"--xtab-layouts: {error}")
    out_dir = Path(args.out) if args.out else None
    args.out_dir = out_dir
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    device_name = torch.cuda.get_device_name(0)
    meta = {
        "case": "meta", "commit": args.commit, "device": device_name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
        "xtab_layouts": args.xtab_layouts or "served", "fused_prompt_base": args.fused_prompt_base,
    }
    try:
        import bitsandbytes
        import peft
        import transformers

        meta.update(transformers=transformers.__version__, peft=peft.__version__, bitsandbytes=bitsandbytes.__version__)
    except Exception as error:  # noqa: BLE001
        meta["import_error"] = repr(error)
    emit(meta, out_dir)

    from llm.fidelity import KOREAN_FINANCE_TEXT

    tokenizer = make_tokenizer(args.tokenizer_file, Path(tempfile.mkdtemp()) / "tok")
    korean_ids = tokenizer(KOREAN_FINANCE_TEXT).input_ids
    if "seed-literal" in cases:
        try:
            case = seed_literal(tokenizer)
        except Exception:  # noqa: BLE001
            case = {"case": "seed-literal", "error": traceback.format_exc(limit=8)}
        emit(case, out_dir)
        free_gpu()

    started = time.perf_counter()
    model = build_seed_model()
    sync()
    emit({"case": "build", "seconds": round(time.perf_counter() - started, 1),
          "allocated_gb": gb(torch.cuda.memory_allocated()), "korean_positions": len(korean_ids)}, out_dir)

    with torch.inference_mode():
        # Kept on the CPU: 47 MB on the GPU would be counted in every serving peak below.
        reference_logits = model(torch.tensor([korean_ids], device="cuda:0")).logits[0].float().cpu()
    from llm.fidelity import kl_summary

    started = time.perf_counter()
    seed_decoded = seed_decode_logits(model, korean_ids)
    # How far the seed's own decode is from its own prompt forward: the floor of any decode KL
    # measured against the prompt forward's logits.
    emit({"case": "seed-decode", "seconds": round(time.perf_counter() - started, 1),
          "fidelity_decode": kl_summary(reference_logits, seed_decoded)}, out_dir)

    if "seed" in cases:
        case: dict = {"case": "seed"}
        try:
            generator = torch.Generator().manual_seed(0)
            prompt = torch.tensor([random_prompt(tokenizer, 32, generator)], device="cuda:0")
            torch.cuda.reset_peak_memory_stats()
            kwargs = dict(do_sample=True, temperature=0.9, top_p=0.8, top_k=50,
                          pad_token_id=tokenizer.eos_token_id)
            with torch.inference_mode():
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                               max_new_tokens=4, **kwargs)  # warm-up
                sync()
                start = time.perf_counter()
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=args.seed_tokens, min_new_tokens=args.seed_tokens, **kwargs)
                sync()
                seconds = time.perf_counter() - start
                new = out.shape[1] - prompt.shape[1]
                case["single"] = {"new_tokens": new, "seconds": round(seconds, 2), "tok_s": round(new / seconds, 1)}
                long_prompt = torch.tensor([random_prompt(tokenizer, 1500, generator)], device="cuda:0")
                start = time.perf_counter()
                model.generate(input_ids=long_prompt, attention_mask=torch.ones_like(long_prompt),
                               max_new_tokens=1, **kwargs)
                sync()
                case["ttft_1500_ms"] = round((time.perf_counter() - start) * 1000, 1)
            case["serving_peak_gb"] = gb(torch.cuda.max_memory_allocated())
        except Exception:  # noqa: BLE001
            case["error"] = traceback.format_exc(limit=5)
        emit(case, out_dir)

    options = dict(compile_kernels=not args.no_compile, triton_kernels=not args.no_triton,
                   paged_kv=not args.static_kv, kv_cache_tokens=args.kv_cache_tokens)
    for name in [c for c in cases if c in ENGINE_MODES]:
        if model is None:  # the previous mode consumed it: the same random model again (same seed)
            free_gpu()
            model = build_seed_model()
        source, model = model, None
        try:
            case = bench_batching_engine(name, lambda src=source, n=name: build_engine(n, src, tokenizer, **options), tokenizer, args,
                                         reference_logits, korean_ids, seed_decoded)
        except Exception:  # noqa: BLE001
            case = {"case": name, "error": traceback.format_exc(limit=8)}
        del source
        emit(case, out_dir)

    add_ratios()
    results = {"meta": meta, "cases": RESULTS[1:]}
    text = json.dumps(results, indent=2)
    if out_dir:
        stamp = dt.date.today().isoformat()
        slug = device_name.lower().replace(" ", "-")
        (out_dir / f"{stamp}-{slug}.json").write_text(text)
    if args.results:
        Path(args.results).write_text(text)
    print_table()
    if out_dir:
        write_chart(out_dir / "engines.png")


ENGINE_MODES = ("nf4", "low-memory", "fast")


def build_engine(name: str, model, tokenizer, compile_kernels: bool = True, triton_kernels: bool = True,  # noqa: ANN001, ANN201
                 paged_kv: bool = True, kv_cache_tokens: int | None = None):
    """One of finbot's modes (`ENGINE_MODES`) from the seed's model (consumed), as the bench serves it:
    16 slots of 2,048 tokens (`low-memory`: 2)."""
    if name == "nf4":
        from llm.serving.nf4 import build_nf4_engine

        return build_nf4_engine(model, tokenizer, max_batch=16, max_seq_len=2048, compile_kernels=compile_kernels,
                                free_source=True, triton_kernels=triton_kernels, kv_cache_tokens=kv_cache_tokens)
    from llm.serving.fast import build_fast_engine, build_low_memory_engine

    if name == "low-memory":
        return build_low_memory_engine(model, tokenizer, max_batch=2, max_seq_len=2048, compile_kernels=compile_kernels)
    if name != "fast":
        raise ValueError(f"no engine mode {name!r}: one of {', '.join(ENGINE_MODES)}")
    return build_fast_engine(model, tokenizer, max_batch=16, max_seq_len=2048, compile_kernels=compile_kernels,
                             free_source=True, triton_kernels=triton_kernels, paged_kv=paged_kv,
                             kv_cache_tokens=kv_cache_tokens)


def free_gpu() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def seed_literal(tokenizer) -> dict:  # noqa: ANN001
    """The seed's code path as the model card writes it, on a saved random checkpoint of the real shape."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MistralForCausalLM

    from llm.synthetic import add_random_lora, mistral_7b_config

    case: dict = {"case": "seed-literal"}
    root = Path(tempfile.mkdtemp(prefix="seed-literal-"))
    try:
        started = time.perf_counter()
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda:0"):
                model = MistralForCausalLM(mistral_7b_config())
        finally:
            torch.set_default_dtype(default)
        model.save_pretrained(root / "base")
        adapter = add_random_lora(model, std=0.02)
        adapter.save_pretrained(root / "adapter")
        del adapter, model
        free_gpu()
        case["checkpoint_write_s"] = round(time.perf_counter() - started, 1)

        # --- the seed's code, as written ---
        started = time.perf_counter()
        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(root / "base", quantization_config=bnb_config, device_map={"": 0})
        model = PeftModel.from_pretrained(model, root / "adapter")
        model.eval()
        sync()
        case["load_s"] = round(time.perf_counter() - started, 1)
        inputs = tokenizer("[INST]기준금리가 뭐야? [/INST]", return_tensors="pt").to("cuda:0")
        kwargs = dict(do_sample=True, temperature=0.9, top_p=0.8, top_k=50, pad_token_id=tokenizer.eos_token_id)
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=8, **kwargs)  # warm-up, outside the timing
            runs = []
            for _ in range(2):
                sync()
                start = time.perf_counter()
                # Random weights rarely say EOS; forced to 256 so every run times the same work.
                out = model.generate(**inputs, max_new_tokens=256, min_new_tokens=256, **kwargs)
                sync()
                runs.append(time.perf_counter() - start)
        new = out.shape[1] - inputs["input_ids"].shape[1]
        best = min(runs)
        case["single"] = {"new_tokens": new, "seconds": round(best, 2), "tok_s": round(new / best, 1),
                          "runs_s": [round(r, 2) for r in runs]}
        case["serving_peak_gb"] = gb(torch.cuda.max_memory_allocated())
        del model
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return case


def add_ratios() -> None:
    """Every case's speed as a multiple of the seed's literal path and of `fast`, same call."""
    by_name = {c["case"]: c for c in RESULTS if "single" in c}
    seed = by_name.get("seed-literal", {}).get("single", {}).get("tok_s")
    fast = by_name.get("fast", {})
    for case in by_name.values():
        ratios = {}
        tok_s = case["single"].get("tok_s")
        if seed and tok_s:
            ratios["single_vs_seed_literal"] = round(tok_s / seed, 2)
        if fast.get("single", {}).get("tok_s") and tok_s:
            ratios["single_vs_fast"] = round(tok_s / fast["single"]["tok_s"], 2)
        stag, fast_stag = case.get("staggered", {}), fast.get("staggered", {})
        if stag.get("requests") == 16 and fast_stag.get("total_tok_s"):
            ratios["staggered16_vs_fast"] = round(stag["total_tok_s"] / fast_stag["total_tok_s"], 2)
        case["ratios"] = ratios


def write_chart(path: Path) -> None:
    """Bar chart of one-stream tok/s, 16-request tok/s and peak GPU memory per case (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = [c for c in RESULTS if "single" in c]
    names = [c["case"] for c in cases]
    panels = [  # None: not measured for that case (the seed's code serves one request at a time)
        ("1 stream, tok/s", [c["single"].get("tok_s") for c in cases]),
        ("16 staggered requests, total tok/s", [c.get("staggered", {}).get("total_tok_s")
                                                if c.get("staggered", {}).get("requests") == 16 else None
                                                for c in cases]),
        ("peak GPU memory, GB", [c.get("serving_peak_gb") for c in cases]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, (title, values) in zip(axes, panels, strict=True):
        bars = axis.bar(names, [v or 0 for v in values],
                        color=["#999999" if n.startswith("seed") else "#1f77b4" if n == "nf4" else "#ff7f0e"
                               for n in names])
        axis.bar_label(bars, labels=["not measured" if v is None else f"{v:.1f}" for v in values], fontsize=8)
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=20)
    meta = RESULTS[0]
    figure.suptitle(f"finbot engines on {meta.get('device')} (random Mistral-7B + LoRA r=32, commit {meta.get('commit')})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def print_table() -> None:
    rows = [("case", "1-stream tok/s", "16-stag tok/s", "p50/p95 s", "TTFT1500 ms", "peak GB", "startup s",
             "KL mean/max", "x seed / x fast")]
    for case in RESULTS:
        if case["case"] in ("meta", "build"):
            continue
        if "error" in case:
            rows.append((case["case"], "ERROR", case["error"].strip().splitlines()[-1][:60], "", "", "", "", "", ""))
            continue
        single = case.get("single", {})
        stag = case.get("staggered", {})
        fid = case.get("fidelity_decode", {})
        rows.append((
            case["case"],
            f"{single.get('tok_s', '')} (dec {single.get('decode_tok_s', '-')})",
            f"{stag.get('total_tok_s', '-')} (n={stag.get('requests', '-')})",
            f"{stag.get('latency_p50_s', '-')}/{stag.get('latency_p95_s', '-')}",
            str(case.get("ttft_1500_ms", "-")),
            f"{case.get('serving_peak_gb', '-')} (start {case.get('startup_peak_gb', '-')})",
            str(case.get("startup_s", "-")),
            f"{fid.get('kl_mean', '-'):.2e}/{fid.get('kl_max', 0):.2e}" if fid else "-",
            f"{case.get('ratios', {}).get('single_vs_seed_literal', '-')} / {case.get('ratios', {}).get('single_vs_fast', '-')}",
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(" | ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
