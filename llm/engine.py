"""The generation engine interface and its simple implementations.

The bot depends only on `GenerationEngine`: prompt token ids in, text chunks out. Chunks are
always whole characters (a Korean syllable often spans several byte-fallback tokens), so a
caller can show them as they come. Once the chunks run out, the `Generation` they came from says
why generation stopped (`FinishReason`): only an answer the token limit cut off may end
mid-sentence, so cleaning trims an unfinished last sentence only then.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EngineChoice = Literal["auto", "reference", "nf4", "fast", "low-memory", "openai", "fake"]

# Why an engine stopped generating:
# - "eos": the model ended its answer (EOS token), so the text is whole;
# - "length": the token limit (max_new_tokens, or the context window) cut it: it may end mid-sentence;
# - "stop": a stop string or stop token the server was given matched; the text is whole up to it;
# - "cancelled": the caller's cancel event, or a consumer that stopped iterating, ended it early;
# - "error": generation failed (the exception is raised to the consumer), or a remote server
#   ended the stream without saying why.
FinishReason = Literal["eos", "length", "stop", "cancelled", "error"]

_R = TypeVar("_R")


class Generation(Iterator[str]):
    """One answer being generated: iterate it for the text chunks, then read `finish_reason`.

    Wraps a generator of whole-character chunks whose return value is the `FinishReason`, so that
    callers keep iterating plain text (``"".join(engine.stream(...))`` and ``for chunk in ...`` work
    as before) and can still learn afterwards whether the text is complete. `finish_reason` is
    None until the chunks run out; it is "error" when the generator raised (the exception still
    reaches the consumer) and "cancelled" when the consumer closed the generation early.

    Any other iterable of chunks (e.g. a third-party engine's own generator) may be wrapped as
    well; one that returns no reason leaves `finish_reason` None ("not said") after it ends.
    """

    def __init__(self, chunks: Generator[str, None, FinishReason] | Iterable[str]) -> None:
        self._chunks: Iterator[str] = iter(chunks)
        self.finish_reason: FinishReason | None = None
        self.finished = False

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        if self.finished:
            raise StopIteration(self.finish_reason)
        try:
            return next(self._chunks)
        except StopIteration as stop:
            self._end(stop.value)
            # Re-raised with the reason so `reason = yield from generation` works in a wrapper too.
            raise StopIteration(self.finish_reason) from None
        except BaseException:
            self._end("error")
            raise

    def close(self) -> None:
        """Stop generating (frees the engine's slot or lock); the reason becomes "cancelled"."""
        if self.finished:
            return
        self._end("cancelled")
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Generation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _end(self, reason: FinishReason | None) -> None:
        self.finished = True
        self.finish_reason = reason


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.9
    top_p: float = 0.8
    top_k: int = 50
    max_new_tokens: int = 256
    # None samples; 0 decodes greedily (used by fidelity checks).
    seed: int | None = None
    greedy: bool = False


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a character.

    Each push decodes only a short window: the tokens since the last emitted delta plus the ones
    before it back to the previous delta (their text is subtracted again), which keeps
    SentencePiece's spacing rules exact without re-decoding the whole answer per token. A
    trailing U+FFFD means the last token ended inside a multi-byte character, so that text is held
    back until the rest of its bytes arrive.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: the token after the delta before last
        self._read = 0  # tokens up to here have been emitted as text

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        if text.endswith("\ufffd") or len(text) <= len(prefix):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """The text not yet emitted; bytes of a character cut off by the end are dropped."""
        text = self._decode(self._prefix)[len(self._decode(self._prefix, self._read)) :]
        self._prefix = self._read = len(self._ids)
        return text.rstrip("\ufffd")


def text_deltas(
    tokenizer: PreTrainedTokenizerBase, token_ids: Generator[int, None, _R] | Iterable[int]
) -> Generator[str, None, _R | None]:
    """Whole-character text chunks for a stream of token ids (what every engine yields).

    Returns what `token_ids` returned (an engine's finish reason; None for a plain iterable), so
    the reason survives decoding. Closing this generator closes `token_ids` too, which is how a
    consumer that walks away frees the engine's slot.
    """
    decoder = IncrementalDecoder(tokenizer)
    tokens = iter(token_ids)
    try:
        while True:
            try:
                token_id = next(tokens)
            except StopIteration as stop:
                result = stop.value
                break
            if delta := decoder.push(token_id):
                yield delta
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
    if tail := decoder.flush():
        yield tail
    return result


class GenerationEngine(ABC):
    """Prompt ids in, text chunks out."""

    tokenizer: PreTrainedTokenizerBase
    name: str = "engine"

    @abstractmethod
    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """The new text as whole-character chunks until EOS, the token limit or `cancel`; the
        returned `Generation` holds the `FinishReason` once iterated. Nothing runs (and nothing
        is raised) before the first chunk is asked for."""

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> str:
        return "".join(self.stream(prompt_ids, params))

    def stats(self) -> dict[str, float]:
        """Load figures for monitoring, any of: queue_depth, running_requests, kv_cache_used_tokens,
        kv_cache_capacity_tokens. Cheap and thread-safe; {} from an engine that does not know them."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release GPU memory and background threads."""


class FakeEngine(GenerationEngine):
    """Answers from a template without a model, at a fixed speed.

    Used for load tests (so the bot's own overhead is what gets measured) and for trying the
    Slack side on a machine without a GPU. `{question}` and `{history_turns}` in the template
    are filled from the prompt it was given, so a test can see what reached the engine.
    """

    name = "fake"

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, reply_template: str, tokens_per_second: float = 0
    ) -> None:
        self.tokenizer = tokenizer
        self._reply_template = reply_template
        self._seconds_per_chunk = 1 / tokens_per_second if tokens_per_second > 0 else 0.0
        self._running = 0
        self._running_lock = threading.Lock()

    def stats(self) -> dict[str, float]:
        return {"running_requests": self._running}

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Generation:
        return Generation(self._words(prompt_ids, params, cancel))

    def _words(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None
    ) -> Generator[str, None, FinishReason]:
        prompt = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
        turns = prompt.split("[INST]")
        question = turns[-1].removesuffix("[/INST]").strip()
        reply = self._reply_template.format(question=question, history_turns=len(turns) - 2)
        # One word stands for one token, so max_new_tokens cuts the reply as it would a model's.
        words = reply.split(" ")
        with self._running_lock:
            self._running += 1
        try:
            for word in words[: params.max_new_tokens]:
                if cancel is not None and cancel.is_set():
                    return "cancelled"
                if self._seconds_per_chunk:
                    time.sleep(self._seconds_per_chunk)
                yield word + " "
        finally:
            with self._running_lock:
                self._running -= 1
        return "length" if len(words) > params.max_new_tokens else "eos"


class HFGenerateEngine(GenerationEngine):
    """Runs `model.generate` with the card's sampling settings, one request at a time.

    This is the seed's path when given the seed's model (4-bit base + unmerged PeftModel), and
    therefore finbot's correctness reference. Requests are serialised with a lock: HF generate
    is not safe to run concurrently on one model.
    """

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, name: str = "reference") -> None:  # noqa: ANN001
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self._lock = threading.Lock()

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Generation:
        return Generation(self._generate(prompt_ids, params, cancel))

    def _eos_ids(self) -> set[int]:
        """Tokens that end generation: the tokenizer's EOS and any the model's generation config adds."""
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list | tuple) else [configured])
        return {int(i) for i in ids if i is not None}

    def _generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None
    ) -> Generator[str, None, FinishReason]:
        import queue

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tokens: queue.Queue[int | None | BaseException] = queue.Queue()
        # Our own flag for "the consumer is gone": setting the caller's `cancel` instead would tell
        # the caller its answer was cancelled when it had merely finished.
        stop = threading.Event()
        eos_ids = self._eos_ids()

        class _TokenQueueStreamer(BaseStreamer):
            def __init__(self) -> None:
                self._saw_prompt = False

            def put(self, value: torch.Tensor) -> None:
                if not self._saw_prompt:  # generate() first hands over the prompt itself
                    self._saw_prompt = True
                    return
                for token_id in value.reshape(-1).tolist():
                    tokens.put(int(token_id))

            def end(self) -> None:
                tokens.put(None)

        class _StopOnCancel(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
                stopped = stop.is_set() or (cancel is not None and cancel.is_set())
                return torch.full((input_ids.shape[0],), stopped, dtype=torch.bool, device=input_ids.device)

        device = next(self.model.parameters()).device
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        generate_kwargs: dict[str, object] = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=params.max_new_tokens,
            streamer=_TokenQueueStreamer(),
            stopping_criteria=StoppingCriteriaList([_StopOnCancel()]),
            pad_token_id=self.tokenizer.eos_token_id,
        )
        if params.greedy:
            generate_kwargs.update(do_sample=False)
        else:
            generate_kwargs.update(
                do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k
            )

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    self.model.generate(**generate_kwargs)
            except BaseException as error:  # handed to the consuming thread, which re-raises it
                tokens.put(error)
                tokens.put(None)

        def generated() -> Generator[int, None, FinishReason]:
            count, last = 0, None
            while (item := tokens.get()) is not None:
                if isinstance(item, BaseException):
                    from llm.errors import GenerationError

                    raise GenerationError(f"{self.name} generation failed: {item!r}") from item
                count, last = count + 1, item
                if item not in eos_ids:
                    yield item
            if last in eos_ids:
                return "eos"
            if count < params.max_new_tokens and cancel is not None and cancel.is_set():
                return "cancelled"
            # Otherwise one of generate's length limits ended it: max_new_tokens (or, in principle,
            # the model config's max_length/max_time), so the text may stop mid-sentence.
            return "length"

        worker = threading.Thread(target=run, name=f"{self.name}-generate", daemon=True)
        worker.start()
        try:
            reason = yield from text_deltas(self.tokenizer, generated())
        finally:
            stop.set()  # a consumer that stops early frees the model for the next request
            worker.join()
        return reason or "eos"
