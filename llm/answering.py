"""From a thread's history and a question to a cleaned answer: prompt → engine → cleaning."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from llm.cleaning import clean_answer
from llm.engine import GenerationEngine, SamplingParams
from llm.prompt import encode_prompt


def stream_raw_answer(
    engine: GenerationEngine,
    history: Sequence[tuple[str, str]],
    question: str,
    params: SamplingParams,
    max_prompt_tokens: int,
    cancel: threading.Event | None = None,
) -> Iterator[str]:
    """The model's new text as it is generated, uncleaned.

    Raises `PromptTooLongError` before any generation when the question alone is over budget.
    """
    prompt_ids = encode_prompt(engine.tokenizer, history, question, max_prompt_tokens)
    return engine.stream(prompt_ids, params, cancel)


def answer_question(
    engine: GenerationEngine,
    history: Sequence[tuple[str, str]],
    question: str,
    params: SamplingParams,
    max_prompt_tokens: int,
) -> str:
    raw = "".join(stream_raw_answer(engine, history, question, params, max_prompt_tokens))
    return clean_answer(raw)
