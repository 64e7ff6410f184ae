"""From a thread's history and a question to a cleaned answer: prompt → engine → cleaning."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from llm.cleaning import clean_answer
from llm.engine import FinishReason, Generation, GenerationEngine, SamplingParams
from llm.prompt import encode_prompt, user_segment


def stream_raw_answer(
    engine: GenerationEngine,
    history: Sequence[tuple[str, str]],
    question: str,
    params: SamplingParams,
    max_prompt_tokens: int,
    cancel: threading.Event | None = None,
) -> Generation:
    """The model's new text as it is generated, uncleaned; once iterated, the returned
    `Generation`'s `finish_reason` says why it stopped (pass it on to `clean_reply`).

    Raises `PromptTooLongError` before any generation when the question alone is over budget.
    """
    prompt_ids = encode_prompt(engine.tokenizer, history, question, max_prompt_tokens)
    chunks = engine.stream(prompt_ids, params, cancel)
    # An engine written against the older interface may hand back a plain iterator; wrapped, its
    # text flows the same and its reason reads None ("not said").
    return chunks if isinstance(chunks, Generation) else Generation(chunks)


def clean_reply(raw_text: str, question: str, finish_reason: FinishReason | None) -> str:
    """The user-facing answer from the model's raw text for `question`.

    The question's own prompt segment is passed along so that an answer which starts by echoing
    it loses the echo; the segment comes from `llm.prompt`, so the echo matched is always the
    layout that was actually sent. `finish_reason` is the generation's: only "length" (the token
    limit cut the answer) lets cleaning trim an unfinished last sentence; any other reason, or
    None (not known), keeps the answer's end as the model wrote it.
    """
    return clean_answer(
        raw_text, prompt_text=user_segment(question), cut_by_token_limit=finish_reason == "length"
    )


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
    generation = stream_raw_answer(engine, history, question, params, max_prompt_tokens)
    raw = "".join(generation)
    return clean_reply(raw, question, generation.finish_reason)
