"""Continuous batching: one scheduler thread steps a slot-based model for all running requests.

A request arriving while others generate is prefilled into a free slot between two decode steps
and joins the next step; it does not wait for the running answers to finish. Requests that
queued up meanwhile are prefilled together when the model offers `prefill_many`. The scheduler only
needs a `StepModel` (prefill one prompt into a slot; one decode step for slots 0..n-1), so its
logic runs on the CPU with the tiny model in CI exactly as it runs on the GPU with CUDA graphs.

Guarantees:
- bounded waiting queue: `submit` raises `EngineBusyError` when it is full;
- per-request cancellation: the caller's `threading.Event`, or a consumer that stops iterating,
  frees the slot at the next step;
- isolation: a request whose prefill or sampling fails gets a `GenerationError`; the others go
  on. A failing decode step (the whole batch) fails the requests in it, and the scheduler keeps
  serving new ones;
- sampling per request with its own `SamplingParams` (temperature, top-k, top-p in HF's order;
  greedy; an optional per-request seed); EOS ends a request and is not emitted;
- every request ends with a `FinishReason` ("eos", "length" for max_new_tokens or the cache end,
  "cancelled"), which the token stream returns and `stream`'s `Generation` holds;
- the stream yields whole characters only (`text_deltas`);
- paged KV cache (a model with `kv_paged`): a request is admitted only when blocks for its prompt
  (+ the first decode position) are free, with one block of growth headroom kept per running
  request; otherwise it waits at the head of the queue (FIFO, no overtaking). A running request
  that cannot get a block for its next position is handled by *preemption with recompute*: the
  in-flight step is settled, then the most recently admitted requests are evicted (blocks freed,
  put back at the head of the queue) until the others can grow. An evicted request keeps its
  emitted tokens and its sampler; on re-admission prompt + emitted tokens are prefilled and it
  continues where it stopped, so the client sees one uninterrupted stream (only later). The
  oldest request always fits (the pool holds at least max_seq_len tokens), so this terminates.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from llm.engine import FinishReason, Generation, GenerationEngine, SamplingParams, text_deltas
from llm.errors import EngineBusyError, GenerationError
from llm.serving import triton_sampling

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class StepModel(Protocol):
    """What the scheduler drives. Slot i of `decode` is row i of its inputs and output."""

    max_batch: int
    max_seq_len: int
    # optional: `device` (where decode's token input should live; CPU if absent)
    # optional, paged KV: `kv_paged` True, `kv_block_size`, `kv_reserve(slot, tokens) -> bool`,
    # `kv_release(slot)`, `kv_free_tokens() -> int`

    def prefill(self, slot: int, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Write the prompt into the slot's KV cache; float32 logits [V] of its last position."""
        ...

    def decode(self, tokens: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Feed tokens[i] (a long tensor, possibly on the device) at positions[i] into slot i;
        float32 logits [len(tokens), V]. May return before the device has finished."""
        ...

    def close(self) -> None: ...


class DecoderStepModel:
    """`StepModel` over `MistralDecoder` + `DecodeGraphs` (graphs on CUDA, eager elsewhere)."""

    def __init__(self, graphs) -> None:  # noqa: ANN001 - llm.serving.mistral_decoder.DecodeGraphs
        self.graphs = graphs
        self.decoder = graphs.decoder
        self.device = graphs.decoder.device
        self.max_batch = graphs.max_batch
        self.max_seq_len = graphs.max_seq_len
        self.kv_paged = self.decoder.paged
        self.kv_block_size = self.decoder.kv.block_size if self.decoder.kv is not None else 0

    def kv_reserve(self, slot: int, tokens: int) -> bool:
        return self.decoder.kv_reserve(slot, tokens)

    def kv_release(self, slot: int) -> None:
        self.decoder.kv_release(slot)

    def kv_free_tokens(self) -> int:
        kv = self.decoder.kv
        return kv.free_tokens if kv is not None else 1 << 60

    def kv_capacity_tokens(self) -> int:
        """Token positions the KV cache holds (paged: its blocks but the scratch block 0)."""
        kv = self.decoder.kv
        return (kv.num_blocks - 1) * kv.block_size if kv is not None else self.max_batch * self.max_seq_len

    def prefill(self, slot: int, prompt_ids: Sequence[int]) -> torch.Tensor:
        return self.prefill_many([slot], [prompt_ids])[0]

    def prefill_many(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Optional `StepModel` method: prompts into their slots in one forward; logits [n, V]."""
        return self.graphs.prefill_many(slots, [torch.tensor(list(p), dtype=torch.long) for p in prompts])

    def decode(self, tokens: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        return self.graphs.decode(tokens, positions)

    def close(self) -> None:
        self.graphs.close()


# --- sampling -----------------------------------------------------------------------------------


def _to_host(tokens: torch.Tensor) -> list[int]:
    # Wait with the GIL released (Stream.synchronize drops it; .tolist() alone would hold it while the
    # GPU works), so consumer threads can stream text meanwhile.
    if tokens.device.type == "cuda":
        torch.cuda.current_stream(tokens.device).synchronize()
    return tokens.tolist()


@dataclass(frozen=True)
class _RowSettings:
    """Per-row sampling settings on the device (float32 unless said)."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor  # the vocabulary size where top-k is off
    greedy: torch.Tensor  # bool
    k_max: int  # the largest top_k of any row
    sampled_top_k: int  # the largest top_k of the sampled rows, 0 if all are greedy


_PARAM_CACHE: dict = {}


def _param_tensors(params: tuple[SamplingParams, ...], vocab: int, device: torch.device) -> _RowSettings:
    """Per-row sampling settings on the device, cached per batch composition (no per-step copies)."""
    key = (params, vocab, str(device))
    cached = _PARAM_CACHE.get(key)
    if cached is not None:
        return cached
    for p in params:
        if not p.greedy and not (p.temperature > 0 and 0 < p.top_p <= 1 and p.top_k >= 0):
            raise ValueError(f"invalid sampling params {p}")
    ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    n = len(params)
    # Each setting's row starts on a 16-byte boundary whatever the batch size: Triton compiles a kernel
    # again for every alignment of its pointers it meets, and unpadded rows would have 3 (run 42: the
    # first batches of 2-15 rows each waited ~2 s for a compile).
    host = torch.zeros((4, -(-n // 4) * 4), dtype=torch.float32)
    host[:, :n] = torch.tensor(
        [[1.0 if p.greedy else p.temperature for p in params], [p.top_p for p in params], ks,
         [float(p.greedy) for p in params]],
        dtype=torch.float32,
    )
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    host = host.to(device, non_blocking=True)[:, :n]
    cached = _RowSettings(
        temperature=host[0], top_p=host[1], top_k=host[2], greedy=host[3].bool(), k_max=max(ks),
        sampled_top_k=max((k for p, k in zip(params, ks, strict=True) if not p.greedy), default=0),
    )
    if len(_PARAM_CACHE) > 256:
        _PARAM_CACHE.clear()
    _PARAM_CACHE[key] = cached
    return cached


def sample_next(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """`sample_tokens`, waited for and returned as Python ints."""
    return _to_host(sample_tokens(logits, params, generators))


def sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One token per row of float32 `logits` [n, V], each row with its own params.

    Same semantics as HF generate's warpers in their order: temperature, then top-k, then top-p
    (keep the smallest set of most likely tokens whose mass reaches top_p, at least one); greedy
    rows take the argmax. Uniforms come from the row's own generator when it has a seed. On a GPU,
    rows with top_k 1-64 are drawn by two Triton launches (`triton_sampling`) instead of ~25
    PyTorch kernels.
    """
    n, vocab = logits.shape
    device = logits.device
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1)
    settings = _param_tensors(tuple(params), vocab, device)
    if any(g is not None for g in generators):
        host = torch.empty(n, dtype=torch.float32, pin_memory=torch.device(device).type == "cuda")
        for row, generator in enumerate(generators):
            host[row] = torch.rand((), generator=generator) if generator is not None else torch.rand(())
        u = host.to(device, non_blocking=True)
    else:
        u = torch.rand(n, device=device)
    if triton_sampling.serves(device, vocab, settings.sampled_top_k):
        try:
            return _triton_draw(logits, settings, u)
        except Exception as error:  # e.g. a Triton that cannot compile the kernels: nobody's answer fails
            triton_sampling.switch_off(f"a draw failed: {error!r}")
    return _pytorch_draw(logits, settings, u)


def _triton_draw(logits: torch.Tensor, settings: _RowSettings, u: torch.Tensor) -> torch.Tensor:
    return triton_sampling.draw(logits, settings.temperature, settings.top_p, settings.top_k, settings.greedy, u)


def _pytorch_draw(logits: torch.Tensor, settings: _RowSettings, u: torch.Tensor) -> torch.Tensor:
    k_max = settings.k_max
    values, indices = torch.topk(logits / settings.temperature[:, None], k_max, dim=-1)  # sorted, descending
    rank = torch.arange(k_max, device=logits.device)[None, :]
    values = values.masked_fill(rank >= settings.top_k[:, None], float("-inf"))
    probs = torch.softmax(values, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = (mass_before < settings.top_p[:, None]) | (rank == 0)
    probs = probs * keep
    cdf = torch.cumsum(probs, dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=k_max - 1)
    sampled = indices.gather(1, choice).squeeze(1)
    return torch.where(settings.greedy, logits.argmax(dim=-1), sampled)


# Start-up check: rows the Triton sampler must draw as PyTorch's does (the rest may differ by a
# rounding step at the top_p edge or at the uniform).
_CHECK_ROWS = 256
_CHECK_AGREEMENT = 0.97


def check_triton_sampling(device: torch.device, vocab: int) -> dict:
    """At start-up, where `triton_sampling` serves: it draws random rows (the seed's settings, greedy
    and top_k=1 rows among them) against PyTorch's sampler with the same uniforms. Where Triton's
    bitonic top-k fails that (a Triton whose `tl.topk` cannot compile these keys), the full sort is
    checked instead (one WARNING). A failure or a disagreement of both switches the path off for this
    process (one WARNING); sampling goes on in PyTorch."""
    if not triton_sampling.serves(device, vocab, triton_sampling.CANDIDATES):
        return {"triton_sampling": False}
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(_CHECK_ROWS, vocab, device=device, generator=generator) * 3
    u = torch.rand(_CHECK_ROWS, device=device, generator=generator)
    kinds = [SamplingParams()] * 6 + [SamplingParams(greedy=True), SamplingParams(top_k=1)]
    params = tuple(kinds[row % len(kinds)] for row in range(_CHECK_ROWS))
    settings = _param_tensors(params, vocab, device)
    same, reason = _agreement(logits, settings, u)
    if reason is not None and triton_sampling.HAS_TOPK:
        triton_sampling.sort_fully(reason)
        same, reason = _agreement(logits, settings, u)
    if reason is None:
        return {"triton_sampling": True, "triton_sampling_agreement": round(same, 4),
                "triton_sampling_topk": triton_sampling.HAS_TOPK}
    triton_sampling.switch_off(reason)
    return {"triton_sampling": False, "triton_sampling_error": reason}


def _agreement(logits: torch.Tensor, settings: _RowSettings, u: torch.Tensor) -> tuple[float, str | None]:
    """The share of rows the Triton path draws as PyTorch's sampler does, and why it fails the start-up
    check (None where it passes)."""
    try:
        same = (_triton_draw(logits, settings, u) == _pytorch_draw(logits, settings, u)).float().mean().item()
    except Exception as error:  # noqa: BLE001 - whatever it is, PyTorch's sampler serves
        return 0.0, f"the start-up check failed: {error!r}"
    if same >= _CHECK_AGREEMENT:
        return same, None
    return same, (f"the start-up check drew PyTorch's tokens for {same:.1%} of {logits.shape[0]} rows "
                  f"(at least {_CHECK_AGREEMENT:.0%} expected)")


# --- requests and scheduler ---------------------------------------------------------------------

_END = object()
_IDLE_ROW = SamplingParams(greedy=True)


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    user_cancel: threading.Event | None
    ignore_eos: bool
    cancel: threading.Event = field(default_factory=threading.Event)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    generator: torch.Generator | None = None
    slot: int = -1
    position: int = 0  # where the next decode step feeds this request's token
    host_token: int | None = None  # a token to feed that is known on the host (after prefill)
    launched: int = 0  # tokens sampled or being sampled (processed or in flight)
    generated: int = 0  # tokens processed
    done: bool = False
    history: list[int] = field(default_factory=list)  # emitted tokens (re-prefilled after preemption)
    last_token: int | None = None  # the latest sample (the next step's input)
    order: int = 0  # admission sequence: preemption evicts the youngest first
    preempted: int = 0
    # Set by the worker before `_END` is queued (the queue orders the write before the read).
    finish_reason: FinishReason = "eos"

    def cancelled(self) -> bool:
        return self.cancel.is_set() or (self.user_cancel is not None and self.user_cancel.is_set())


class BatchScheduler:
    """Owns the model and one worker thread; see the module docstring."""

    def __init__(
        self,
        model: StepModel,
        eos_token_id: int | None,
        max_queue: int = 32,
        name: str = "batch",
        idle_wait_s: float = 0.05,
    ) -> None:
        self.model = model
        self.eos_token_id = eos_token_id
        self.max_queue = max_queue
        self.name = name
        self._idle_wait_s = idle_wait_s
        self._ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._slots: list[_Request | None] = [None] * model.max_batch
        self._wake = threading.Condition()
        self._stopping = False
        self._inflight: tuple[list[_Request], torch.Tensor, torch.Tensor, object] | None = None
        self.steps = 0
        self.preemptions = 0
        # Host-side time profile (seconds, cumulative): where the worker thread spends its time.
        # `deliver_wait_s` is the wait for the device to finish a step: near zero means the host,
        # not the GPU, limits the step rate.
        self.profile = {"prefill_s": 0.0, "prefills": 0, "launch_s": 0.0, "deliver_wait_s": 0.0, "deliver_s": 0.0}
        self._admissions = itertools.count()
        self._paged = bool(getattr(model, "kv_paged", False))
        self._thread = threading.Thread(target=self._run, name=f"{name}-scheduler", daemon=True)
        self._thread.start()

    # -- caller side --

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
        ignore_eos: bool = False,
    ) -> _Request:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise GenerationError(f"{self.name}: empty prompt")
        if len(prompt) >= self.model.max_seq_len:
            raise GenerationError(
                f"{self.name}: prompt of {len(prompt)} tokens leaves no room in max_seq_len "
                f"{self.model.max_seq_len}"
            )
        request = _Request(next(self._ids), prompt, params, cancel, ignore_eos)
        if params.seed is not None and not params.greedy:
            request.generator = torch.Generator().manual_seed(params.seed)
        with self._wake:
            if self._stopping:
                raise GenerationError(f"{self.name}: engine is closed")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusyError(f"{self.name}: {len(self._waiting)} requests already waiting")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def tokens(self, request: _Request) -> Generator[int, None, FinishReason]:
        """The request's new token ids as they come, then (as the generator's return value) why it
        ended. Stopping early cancels the request."""
        try:
            while True:
                try:
                    item = request.out.get(timeout=1.0)
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise GenerationError(f"{self.name}: scheduler thread died") from None
                    continue
                if item is _END:
                    return request.finish_reason
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancel.set()
            with self._wake:
                self._wake.notify()

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def kv_usage(self) -> tuple[int, int] | None:
        """(token positions in use, capacity) of the KV cache; None when the model does not say.
        Read without the worker's lock: a monitoring figure may be one step old."""
        capacity = getattr(self.model, "kv_capacity_tokens", None)
        if capacity is None:
            return None
        if self._paged:
            total = capacity()
            return total - self.model.kv_free_tokens(), total
        # A static cache reserves max_seq_len per slot; in use is what the running requests filled.
        return sum(r.position for r in list(self._slots) if r is not None), capacity()

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)
        error = GenerationError(f"{self.name}: engine closed")
        for request in list(self._waiting) + [r for r in self._slots if r is not None]:
            self._finish(request, error)
        self._waiting.clear()
        self.model.close()

    # -- worker side --

    def _finish(
        self, request: _Request, error: BaseException | None = None, *, reason: FinishReason = "error"
    ) -> None:
        if request.done:
            return
        request.done = True
        request.finish_reason = "error" if error is not None else reason
        request.out.put(error if error is not None else _END)
        if 0 <= request.slot < len(self._slots) and self._slots[request.slot] is request:
            self._slots[request.slot] = None
            if self._paged:  # the device may still run a step on these blocks: stream order
                self.model.kv_release(request.slot)  # makes any later writer wait for it

    def _emit(self, request: _Request, token: int) -> None:
        """Record a sampled token; end the request on EOS, its token limit or the cache end."""
        request.generated += 1
        request.last_token = token
        if token == self.eos_token_id and not request.ignore_eos:
            self._finish(request, reason="eos")
            return
        request.history.append(token)
        request.out.put(token)
        # The end of the KV cache is a token limit too: either way the answer may stop mid-sentence.
        if request.generated >= request.params.max_new_tokens or request.position >= self.model.max_seq_len:
            self._finish(request, reason="length")

    # Prompt tokens prefilled together at most (bounds the activations and the decode stall).
    prefill_token_budget = 2048

    def _admit(self) -> None:
        """Move waiting requests into free slots and prefill them. Requests that arrived together
        (they queued during a decode step) are prefilled in one forward when the model offers
        `prefill_many`: the 7B weights are read once for all of them instead of once each."""
        while True:
            batch: list[_Request] = []
            tokens = 0
            with self._wake:
                free = [i for i, r in enumerate(self._slots) if r is None]
                while free and self._waiting:
                    request = self._waiting[0]
                    length = len(request.prompt) + len(request.history)
                    if batch and tokens + length > self.prefill_token_budget:
                        break
                    if request.cancelled() or request.params.max_new_tokens <= 0:
                        self._waiting.popleft()
                        self._finish(request, reason="cancelled" if request.cancelled() else "length")
                        continue
                    if self._paged and not self._kv_admit(free[0], length + 1):
                        break  # waits at the head of the queue until blocks are freed
                    self._waiting.popleft()
                    request.slot = free.pop(0)
                    request.order = next(self._admissions)
                    self._slots[request.slot] = request
                    batch.append(request)
                    tokens += length
            if not batch:
                return
            started = time.perf_counter()
            try:
                self._prefill_batch(batch)
            finally:
                self.profile["prefill_s"] += time.perf_counter() - started
                self.profile["prefills"] += len(batch)

    def _prefill_batch(self, batch: list[_Request]) -> None:
        if len(batch) > 1 and hasattr(self.model, "prefill_many"):
            try:
                logits = self.model.prefill_many([r.slot for r in batch], [r.prompt + r.history for r in batch])
                sampled = sample_next(logits, [r.params for r in batch], [r.generator for r in batch])
            except Exception:  # retry one by one: only a culprit fails
                logger.exception("%s: batched prefill failed; prefilling one by one", self.name)
            else:
                for request, token in zip(batch, sampled, strict=True):
                    self._started(request, token)
                return
        for request in batch:
            self._prefill_one(request)

    def _kv_admit(self, slot: int, tokens: int) -> bool:
        """Reserve blocks for a new request's prefill + first decode position, keeping one block of
        growth headroom per running (or just admitted) request so admissions rarely force a
        preemption a few steps later."""
        self.model.kv_release(slot)  # leftovers of direct prefill calls (warm-up, fidelity checks)
        headroom = sum(r is not None for r in self._slots) * self.model.kv_block_size
        if self.model.kv_free_tokens() < tokens + headroom:
            return False
        return self.model.kv_reserve(slot, tokens)

    def _started(self, request: _Request, token: int) -> None:
        # After a preemption the prefill covered prompt + history: continue from there.
        request.position = len(request.prompt) + len(request.history)
        request.launched = request.generated + 1
        request.host_token = token
        self._emit(request, token)

    def _prefill_one(self, request: _Request) -> None:
        try:
            logits = self.model.prefill(request.slot, request.prompt + request.history)
            token = sample_next(logits[None], [request.params], [request.generator])[0]
            self._started(request, token)
        except Exception as error:  # this request only
            logger.exception("%s: request %d failed in prefill", self.name, request.id)
            self._finish(request, GenerationError(f"{self.name}: prefill failed: {error!r}"))
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()

    def _step(self) -> None:
        """Launch decode step t (+ its sampling) on the device, then, while it runs, hand out the
        tokens of step t-1. Step t's input tokens are step t-1's samples, still on the device, so
        the host never stalls the GPU between steps. A request that ends at t-1 (EOS, cancel) has
        one wasted row in step t, which is dropped."""
        for request in [r for r in self._slots if r is not None]:
            if request.cancelled():
                self._finish(request, reason="cancelled")
        if self._paged:
            self._grow()
        started = time.perf_counter()
        launched = self._launch()
        self.profile["launch_s"] += time.perf_counter() - started
        previous, self._inflight = self._inflight, launched
        if previous is not None:
            self._deliver(*previous)

    def _decoding(self) -> list[_Request]:
        """Requests that take a row in the next step, oldest admission first."""
        return sorted(
            (r for r in self._slots
             if r is not None and not r.done
             and r.launched < r.params.max_new_tokens and r.position < self.model.max_seq_len),
            key=lambda r: r.order,
        )

    def _grow(self) -> None:
        """Blocks for every decoding request's next position; preempt (see module docstring)
        when the pool is out of blocks."""
        if all(self.model.kv_reserve(r.slot, r.position + 1) for r in self._decoding()):
            return
        if self._inflight is not None:  # settle step t-1 so every sampled token is on the host
            previous, self._inflight = self._inflight, None
            self._deliver(*previous)
            for request in self._slots:
                if request is not None and not request.done:
                    request.host_token = request.last_token  # fed from the host, not the device
        running = self._decoding()
        while running and not all(self.model.kv_reserve(r.slot, r.position + 1) for r in running):
            self._preempt(running.pop())  # the youngest

    def _preempt(self, request: _Request) -> None:
        logger.info("%s: KV cache full, preempting request %d after %d tokens",
                    self.name, request.id, request.generated)
        self.preemptions += 1
        request.preempted += 1
        self.model.kv_release(request.slot)
        self._slots[request.slot] = None
        request.slot = -1
        request.host_token = None
        with self._wake:
            self._waiting.appendleft(request)

    def _launch(self) -> tuple[list[_Request], torch.Tensor, torch.Tensor, object] | None:
        running = [
            r for r in self._slots
            if r is not None and not r.done
            and r.launched < r.params.max_new_tokens and r.position < self.model.max_seq_len
        ]
        if not running:
            return None
        n = max(r.slot for r in running) + 1
        positions = [0] * n
        for request in running:
            positions[request.slot] = request.position
        try:
            tokens = self._input_tokens(running, n)
            logits = self.model.decode(tokens, positions)
        except Exception as error:  # the whole batch's step failed: fail its requests, keep serving
            logger.exception("%s: decode step failed for %d requests", self.name, len(running))
            for request in running:
                self._finish(request, GenerationError(f"{self.name}: decode failed: {error!r}"))
            return None
        self.steps += 1
        for request in running:
            request.position += 1
            request.launched += 1
        # Sample every row 0..n-1 (idle rows greedily, result unused) so that row == slot and the
        # samples can feed the next step as they are: no index tensors, no host round trip.
        by_slot: list[_Request | None] = [None] * n
        for request in running:
            by_slot[request.slot] = request
        params = [r.params if r is not None else _IDLE_ROW for r in by_slot]
        generators = [r.generator if r is not None else None for r in by_slot]
        try:
            sampled = sample_tokens(logits, params, generators)
        except Exception:  # find the culprit(s): sample row by row
            parts = []
            for index, request in enumerate(by_slot):
                try:
                    parts.append(sample_tokens(logits[index : index + 1], [params[index]], [generators[index]]))
                except Exception as error:
                    if request is not None:
                        self._finish(request, GenerationError(f"{self.name}: sampling failed: {error!r}"))
                    parts.append(torch.zeros(1, dtype=torch.long, device=logits.device))
            sampled = torch.cat(parts)
        if sampled.device.type == "cuda":
            host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
            host.copy_(sampled, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = sampled, None
        return running, sampled, host, ready

    def _input_tokens(self, running: list[_Request], n: int) -> torch.Tensor:
        """This step's input per slot: the previous step's sample (still on the device), or the
        host-known token of a request that was just prefilled. Only asynchronous device work."""
        previous = self._inflight
        device = previous[1].device if previous is not None else getattr(self.model, "device", "cpu")
        tokens = torch.zeros(n, dtype=torch.long, device=device)
        if previous is not None:
            m = min(n, previous[1].shape[0])
            tokens[:m] = previous[1][:m]
        for request in running:
            if request.host_token is not None:
                tokens[request.slot] = request.host_token  # a fill kernel, no copy
                request.host_token = None
        return tokens

    def _deliver(self, requests: list[_Request], sampled: torch.Tensor, host: torch.Tensor, ready) -> None:  # noqa: ANN001
        started = time.perf_counter()
        if ready is not None:
            ready.synchronize()  # releases the GIL while the GPU finishes
        waited = time.perf_counter()
        tokens = host.tolist()
        for request in requests:
            if not request.done:
                self._emit(request, tokens[request.slot])
        self.profile["deliver_wait_s"] += waited - started
        self.profile["deliver_s"] += time.perf_counter() - waited

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                if not self._waiting and self.active == 0 and self._inflight is None:
                    self._wake.wait(self._idle_wait_s)
                    continue
            try:
                self._admit()
                self._step()
            except Exception:  # never let the worker die: fail what is running and go on
                logger.exception("%s: scheduler step failed", self.name)
                self._inflight = None
                for request in [r for r in self._slots if r is not None]:
                    self._finish(request, GenerationError(f"{self.name}: internal scheduler error"))


class BatchingEngine(GenerationEngine):
    """`GenerationEngine` over a `BatchScheduler` (the `fast` and `low-memory` modes)."""

    def __init__(
        self,
        model: StepModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        max_queue: int = 32,
        info: dict | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.info = dict(info or {})
        self.scheduler = BatchScheduler(model, tokenizer.eos_token_id, max_queue=max_queue, name=name)

    def stream_tokens(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
        ignore_eos: bool = False,
    ) -> Generator[int, None, FinishReason]:
        """New token ids (EOS excluded) as they are sampled, returning the `FinishReason`;
        `ignore_eos` forces the full length."""
        request = self.scheduler.submit(prompt_ids, params, cancel, ignore_eos=ignore_eos)
        return (yield from self.scheduler.tokens(request))

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Generation:
        return Generation(self._text(prompt_ids, params, cancel))

    def _text(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None
    ) -> Generator[str, None, FinishReason]:
        reason = yield from text_deltas(self.tokenizer, self.stream_tokens(prompt_ids, params, cancel))
        return reason or "eos"

    def stats(self) -> dict[str, float]:
        stats: dict[str, float] = {"queue_depth": self.scheduler.waiting, "running_requests": self.scheduler.active}
        usage = self.scheduler.kv_usage()
        if usage is not None:
            stats["kv_cache_used_tokens"], stats["kv_cache_capacity_tokens"] = usage
        return stats

    def close(self) -> None:
        self.scheduler.close()
