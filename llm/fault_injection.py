"""Making the engine fail on purpose for chosen questions (`FAKE_FAIL_ON`), to test the bot's faults.

`FaultInjectingEngine` wraps any engine. A question containing one of its markers fails the way a
GPU fails for one request while the others go on:

- ``oom``: ``torch.OutOfMemoryError`` before any text, as when the prompt's KV cache cannot be
  allocated (prefill);
- ``cuda``: ``RuntimeError("CUDA error: an illegal memory access was encountered")`` after the first
  few chunks of text, as a failing decode step does (mid-answer).

Every message ends with "(injected by FAKE_FAIL_ON)", so nobody mistakes it for a real fault. Only
the question being answered is matched, never the thread's history. Nothing here needs CUDA.

The setting is a ``;``-separated list of ``KIND:MARKER`` rules (KIND ``oom`` or ``cuda``; a rule
without a known kind is an ``oom`` marker), e.g. ``FAKE_FAIL_ON=oom:메모리폭탄;cuda:장치오류``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from llm import engine as engine_module
from llm.engine import GenerationEngine, SamplingParams

FaultKind = Literal["oom", "cuda"]
KINDS: tuple[FaultKind, ...] = ("oom", "cuda")
INJECTED = "(injected by FAKE_FAIL_ON)"
# A `cuda` fault comes after this many chunks of text: the answer has started showing.
CUDA_FAULT_AFTER_CHUNKS = 3


@dataclass(frozen=True)
class FaultRule:
    marker: str
    kind: FaultKind


def parse_fail_on(value: str) -> tuple[FaultRule, ...]:
    """The rules of a `FAKE_FAIL_ON` value (see the module docstring); empty for an empty value."""
    rules: list[FaultRule] = []
    for item in value.split(";"):
        item = item.strip()
        if not item:
            continue
        kind, separator, marker = item.partition(":")
        if separator and kind.strip().lower() in KINDS:
            rule = FaultRule(marker.strip(), kind.strip().lower())  # type: ignore[arg-type]
        else:
            rule = FaultRule(item, "oom")
        if not rule.marker:
            raise ValueError(f"FAKE_FAIL_ON rule {item!r} has no text to match")
        rules.append(rule)
    return tuple(rules)


class _OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError where torch is not installed."""


def out_of_memory_error() -> RuntimeError:
    try:
        import torch

        error_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    except (ImportError, AttributeError):
        error_type = _OutOfMemoryError
    return error_type(
        "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity; "
        f"77.62 GiB already allocated) {INJECTED}"
    )


def cuda_error() -> RuntimeError:
    return RuntimeError(f"CUDA error: an illegal memory access was encountered {INJECTED}")


def current_question(engine: GenerationEngine, prompt_ids: Sequence[int]) -> str:
    """The last user turn of a Mistral instruction prompt (what FakeEngine answers too)."""
    prompt = engine.tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    return prompt.split("[INST]")[-1].split("[/INST]")[0].strip()


class FaultInjectingEngine(GenerationEngine):
    """`inner`, except that questions matching `rules` fail (see the module docstring)."""

    def __init__(self, inner: GenerationEngine, rules: Sequence[FaultRule]) -> None:
        self._inner = inner
        self._rules = tuple(rules)
        self.tokenizer = inner.tokenizer
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        # Anything else the bot may ask the engine (queue sizes, ...) is the inner engine's.
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def rule_for(self, prompt_ids: Sequence[int]) -> FaultRule | None:
        question = current_question(self._inner, prompt_ids)
        return next((rule for rule in self._rules if rule.marker in question), None)

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Any:  # the inner engine's stream type (an iterator of text chunks)
        rule = self.rule_for(prompt_ids)
        if rule is None:
            return self._inner.stream(prompt_ids, params, cancel)
        failing = self._failing(rule, prompt_ids, params, cancel)
        # Engines that report why they stopped wrap their chunks in llm.engine.Generation.
        generation = getattr(engine_module, "Generation", None)
        return generation(failing) if generation is not None else failing

    def _failing(
        self, rule: FaultRule, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None
    ) -> Iterator[str]:
        if rule.kind == "oom":
            raise out_of_memory_error()
        chunks = self._inner.stream(prompt_ids, params, cancel)
        try:
            for index, chunk in enumerate(chunks):
                yield chunk
                if index + 1 >= CUDA_FAULT_AFTER_CHUNKS:
                    break
            raise cuda_error()
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def stats(self) -> dict[str, float]:
        # Defined on GenerationEngine, so __getattr__ would never forward it.
        return self._inner.stats()

    def close(self) -> None:
        self._inner.close()


def with_faults(engine: GenerationEngine, fail_on: str) -> GenerationEngine:
    """`engine`, wrapped to fail the questions `fail_on` names (unchanged when it is empty)."""
    rules = parse_fail_on(fail_on)
    return FaultInjectingEngine(engine, rules) if rules else engine
