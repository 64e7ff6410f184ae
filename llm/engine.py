"""The generation engine interface and its simple implementations.

The bot depends only on `GenerationEngine`: prompt token ids in, text chunks out. Chunks are
always whole characters (a Korean syllable often spans several byte-fallback tokens), so a
caller can show them as they come.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EngineChoice = Literal["auto", "reference", "fast", "low-memory", "openai", "fake"]


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

    Decoding the whole suffix each time keeps SentencePiece's spacing rules exact; a trailing
    U+FFFD means the last token ended inside a multi-byte character, so that text is held back
    until the rest of its bytes arrive.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        delta, self._emitted = text[self._emitted :], len(text)
        return delta

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids, skip_special_tokens=False)
        delta, self._emitted = text[self._emitted :], len(text)
        return delta


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
    ) -> Iterator[str]:
        """Yield the new text as whole-character chunks until EOS, the token limit or `cancel`."""

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> str:
        return "".join(self.stream(prompt_ids, params))

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

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        prompt = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
        turns = prompt.split("[INST]")
        question = turns[-1].removesuffix("[/INST]").strip()
        reply = self._reply_template.format(question=question, history_turns=len(turns) - 2)
        for word in reply.split(" ")[: params.max_new_tokens]:
            if cancel is not None and cancel.is_set():
                return
            if self._seconds_per_chunk:
                time.sleep(self._seconds_per_chunk)
            yield word + " "


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
    ) -> Iterator[str]:
        import queue

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tokens: queue.Queue[int | None | BaseException] = queue.Queue()
        cancel = cancel or threading.Event()

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
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

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

        worker = threading.Thread(target=run, name=f"{self.name}-generate", daemon=True)
        worker.start()
        decoder = IncrementalDecoder(self.tokenizer)
        eos_id = self.tokenizer.eos_token_id
        try:
            while (item := tokens.get()) is not None:
                if isinstance(item, BaseException):
                    from llm.errors import GenerationError

                    raise GenerationError(f"{self.name} generation failed: {item!r}") from item
                if item == eos_id:
                    continue
                if delta := decoder.push(item):
                    yield delta
            if tail := decoder.flush():
                yield tail
        finally:
            cancel.set()  # a consumer that stops early frees the model for the next request
            worker.join()
