"""From a thread's history and a question to a cleaned answer: prompt → engine → cleaning."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from llm.cleaning import clean_answer
from llm.engine import GenerationEngine, SamplingParams
from llm.prompt import encode_prompt, user_segment


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


def clean_reply(raw_text: str, question: str) -> str:
    """The user-facing answer from the model's raw text for `question`.

    The question's own prompt segment is passed along so that an answer which starts by echoing
    it loses the echo; the segment comes from `llm.prompt`, so the echo matched is always the
    layout that was actually sent.
    """
    return clean_answer(raw_text, prompt_text=user_segment(question))


def answer_question(
    engine: GenerationEngine,
    history: Sequence[tuple[str, str]],
    question: str,
    params: SamplingParams,
    max_prompt_tokens: int,
) -> str:
    """Generate one whole answer to `question` after `history` and clean it.

    Raises `PromptTooLongError` when the question alone is over budget, and whatever the engine
    raises while generating.
    """
    raw = "".join(stream_raw_answer(engine, history, question, params, max_prompt_tokens))
    return clean_reply(raw, question)
