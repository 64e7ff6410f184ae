"""When an answer cannot be given: the user gets a polite Korean reply in the thread, the question
stays stored (marked failed, with the reason for operators) and the bot keeps serving others."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from slack_sdk import WebClient

from bot import messages_ko, metrics
from bot.replies import AnswerService, IncomingQuestion
from llm.engine import FakeEngine, GenerationEngine, SamplingParams
from llm.errors import EngineBusyError
from storage.conversations import ConversationStore
from storage.db import open_database, upgrade_database
from tests.fakes.slack_server import FakeSlack


class FailingEngine(GenerationEngine):
    """Raises `error` for questions containing "실패", answers the others normally."""

    def __init__(self, tokenizer, error: BaseException) -> None:
        self.tokenizer = tokenizer
        self._error = error
        self._fake = FakeEngine(tokenizer, "정상 답변입니다.")

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        if "실패" in self.tokenizer.decode(list(prompt_ids)):
            raise self._error
        yield from self._fake.stream(prompt_ids, params, cancel)


@pytest.fixture
def store(tmp_path: Path) -> ConversationStore:
    url = f"sqlite:///{tmp_path / 'finbot.db'}"
    upgrade_database(url)
    return ConversationStore(open_database(url))


def _ask(service: AnswerService, fake: FakeSlack, channel: str, text: str) -> str:
    client = WebClient(token=fake.bot_token, base_url=fake.api_url)
    thread = fake.next_ts()
    future = service.submit(client, IncomingQuestion(fake.team_id, channel, thread, thread, "U1", text))
    assert future is not None
    future.result(timeout=30)
    return thread


def _final_text(fake: FakeSlack, channel: str, thread: str) -> str:
    [message] = [m for m in fake.messages(channel=channel, thread_ts=thread) if m.get("bot_id")]
    return message["text"]


def _status(store: ConversationStore, channel: str, thread: str) -> tuple[str, str | None]:
    from sqlalchemy import select

    from storage.models import Message

    conversation = store.find_conversation("T0001", channel, thread)
    with store.session_factory() as session:
        [(status, error)] = session.execute(
            select(Message.status, Message.error).where(
                Message.conversation_id == conversation, Message.role == "user"
            )
        ).all()
    return status, error


@pytest.mark.parametrize(
    ("error", "reply", "logged", "counted"),
    [
        (RuntimeError("CUDA out of memory"), messages_ko.GENERATION_FAILED, "CUDA out of memory",
         ("failed", "engine_error")),
        (EngineBusyError("queue full"), messages_ko.ENGINE_BUSY, "engine busy", ("refused", "busy")),
    ],
)
def test_engine_errors_get_a_polite_reply_and_others_are_still_answered(
    store, mistral_tokenizer, error, reply, logged, counted
) -> None:

    def counts() -> tuple[float | None, float | None]:
        sample = metrics.REGISTRY.get_sample_value
        return (
            sample("finbot_questions_total", {"outcome": counted[0], "reason": counted[1]}),
            sample("finbot_questions_total", {"outcome": "answered", "reason": ""}),
        )

    before = counts()
    service = AnswerService(store, FailingEngine(mistral_tokenizer, error), SamplingParams(), 512, workers=2)
    with FakeSlack() as fake:
        failed = _ask(service, fake, "C1", "이 질문은 실패해요")
        fine = _ask(service, fake, "C1", "기준금리가 뭐야?")
        service.shutdown()
        assert _final_text(fake, "C1", failed) == reply
        assert _final_text(fake, "C1", fine) == "정상 답변입니다."
    status, reason = _status(store, "C1", failed)
    assert status == "failed" and logged in reason
    assert _status(store, "C1", fine)[0] == "answered"
    # finbot_questions_total counts each once under its outcome (see bot/metrics.py).
    assert counts() == (before[0] + 1, before[1] + 1)


def test_an_answer_past_the_timeout_is_stopped_with_an_apology(store, mistral_tokenizer) -> None:
    slow = FakeEngine(mistral_tokenizer, " ".join(["금리는"] * 200), tokens_per_second=20)
    service = AnswerService(store, slow, SamplingParams(), 512, workers=1, timeout_s=0.5)
    with FakeSlack() as fake:
        thread = _ask(service, fake, "C2", "아주 긴 설명을 해줘")
        service.shutdown()
        assert _final_text(fake, "C2", thread) == messages_ko.GENERATION_TIMED_OUT
    status, reason = _status(store, "C2", thread)
    assert status == "failed" and "0.5 s" in reason
