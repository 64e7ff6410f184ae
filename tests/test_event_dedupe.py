"""Slack event dedupe with rate limits on: the event is claimed in the transaction that stores the
question, so a question that failed to store is answered when Slack retries the event, and a
redelivery of one already stored is never answered (nor refused) a second time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from slack_sdk import WebClient
from sqlalchemy.exc import OperationalError

from bot import messages_ko
from bot.rate_limits import QuestionRateLimiter
from bot.replies import AnswerService, IncomingQuestion
from llm.engine import FakeEngine, SamplingParams
from storage.conversations import ConversationStore
from storage.db import open_database, upgrade_database
from tests.fakes.slack_server import FakeSlack


@pytest.fixture
def store(tmp_path: Path) -> ConversationStore:
    url = f"sqlite:///{tmp_path / 'finbot.db'}"
    upgrade_database(url)
    return ConversationStore(open_database(url))


def _bot_texts(fake: FakeSlack, channel: str, thread_ts: str) -> list[str]:
    return [m["text"] for m in fake.messages(channel=channel, thread_ts=thread_ts) if m.get("bot_id")]


def test_a_question_that_failed_to_store_is_answered_on_slacks_retry(
    store: ConversationStore, mistral_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_question = store.store_question
    claimed: list[str | None] = []

    def fails_once(*args: Any, **kwargs: Any) -> tuple[int, int] | None:
        claimed.append(kwargs.get("event_id"))
        if len(claimed) == 1:
            # store_question rolls back on failure: neither the claim nor the question is left.
            raise OperationalError("INSERT INTO messages", {}, Exception("database is locked"))
        return store_question(*args, **kwargs)

    monkeypatch.setattr(store, "store_question", fails_once)
    limiter = QuestionRateLimiter(per_user=2, per_channel=30, window_seconds=600)
    engine = FakeEngine(mistral_tokenizer, "기준금리는 정책금리예요.")
    service = AnswerService(store, engine, SamplingParams(), 512, workers=1, rate_limiter=limiter)
    with FakeSlack() as fake:
        client = WebClient(token=fake.bot_token, base_url=fake.api_url)

        def ask(text: str) -> tuple[str, IncomingQuestion]:
            thread = fake.next_ts()
            return thread, IncomingQuestion(fake.team_id, "C1", thread, thread, "U1", text)

        thread, question = ask("기준금리가 뭐야?")
        with pytest.raises(OperationalError):
            service.submit(client, question, event_id="Ev1")
        # Slack's retry of the same event is answered, not dropped as already handled.
        future = service.submit(client, question, event_id="Ev1")
        assert future is not None
        future.result(timeout=30)
        assert claimed == ["Ev1", "Ev1"]  # the claim happens inside store_question, every time
        assert _bot_texts(fake, "C1", thread) == ["기준금리는 정책금리예요."]

        # A duplicate delivery after the answer: no second answer and no rate-limit notice.
        assert service.submit(client, question, event_id="Ev1") is None

        # The failed attempt and the duplicate used none of the quota (2 per user): one more
        # question is answered, the next one is refused politely.
        second_thread, second = ask("환율은?")
        future = service.submit(client, second, event_id="Ev2")
        assert future is not None
        future.result(timeout=30)
        third_thread, third = ask("국채는?")
        assert service.submit(client, third, event_id="Ev3") is None
        # A redelivery of the refused event is not refused a second time.
        assert service.submit(client, third, event_id="Ev3") is None
        service.shutdown()
        assert _bot_texts(fake, "C1", thread) == ["기준금리는 정책금리예요."]
        assert _bot_texts(fake, "C1", second_thread) == ["기준금리는 정책금리예요."]
        assert _bot_texts(fake, "C1", third_thread) == [messages_ko.RATE_LIMITED_USER]
