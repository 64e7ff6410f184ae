"""Crash recovery: interrupted questions are re-answered or get an apology, exactly once."""

from __future__ import annotations

import signal
from datetime import timedelta

import pytest
from slack_sdk import WebClient
from sqlalchemy import update

from bot.messages_ko import ANSWER_INTERRUPTED
from bot.recovery import recover_interrupted
from storage.conversations import ConversationStore
from storage.db import create_db_engine, make_session_factory, upgrade_database
from storage.models import Message, utcnow
from tests.e2e.process import start_finbot
from tests.fakes.slack_server import FakeSlack


class RecordingAnswers:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def answer_stored(self, client: WebClient, message_id: int) -> None:
        self.calls.append(message_id)


def _question(session_factory, thread_ts: str, status: str, age: timedelta, reply_ts: str | None = None) -> int:
    stored = ConversationStore(session_factory).store_question("T0001", "C1", thread_ts, f"질문 {thread_ts}", "U1", thread_ts)
    assert stored is not None
    message_id = stored[1]
    with session_factory() as session:
        session.execute(
            update(Message).where(Message.id == message_id)
            .values(status=status, created_at=utcnow() - age, reply_ts=reply_ts)
        )
        session.commit()
    return message_id


def test_recent_are_reanswered_old_get_an_apology_and_each_only_once(session_factory):
    with FakeSlack() as fake:
        client = WebClient(base_url=fake.api_url, token=fake.bot_token)
        placeholder = client.chat_postMessage(channel="C1", thread_ts="100.1", text="답변을 준비하고 있어요…")["ts"]
        recent_received = _question(session_factory, "200.1", "received", timedelta(minutes=3))
        recent_generating = _question(session_factory, "200.2", "generating", timedelta(minutes=5))
        too_fresh = _question(session_factory, "200.3", "generating", timedelta(seconds=10))
        old_with_reply = _question(session_factory, "100.1", "generating", timedelta(hours=2), reply_ts=placeholder)
        old_without = _question(session_factory, "100.2", "received", timedelta(days=1))
        answered = _question(session_factory, "300.1", "answered", timedelta(minutes=3))
        failed = _question(session_factory, "300.2", "failed", timedelta(minutes=3))

        answers = RecordingAnswers()
        result = recover_interrupted(
            session_factory, answers, client, max_age=timedelta(minutes=30), min_age=timedelta(minutes=1), owner="a"
        )
        assert sorted(result.reanswered) == sorted(answers.calls) == [recent_received, recent_generating]
        assert sorted(result.apologised) == [old_with_reply, old_without]
        # The stored reply message was reused; the other got a new message in its thread.
        assert fake.messages(channel="C1", thread_ts="100.1")[-1]["text"] == ANSWER_INTERRUPTED
        assert [m["text"] for m in fake.messages(channel="C1", thread_ts="100.2")] == [ANSWER_INTERRUPTED]
        with session_factory() as session:
            statuses = dict(session.query(Message.id, Message.status).all())
        assert statuses[old_with_reply] == statuses[old_without] == "failed"
        assert statuses[too_fresh] == "generating" and statuses[answered] == "answered" and statuses[failed] == "failed"

        # A second instance starting right after finds nothing left to claim.
        other = RecordingAnswers()
        again = recover_interrupted(
            session_factory, other, client, max_age=timedelta(minutes=30), min_age=timedelta(minutes=1), owner="b"
        )
        assert (again.reanswered, again.apologised, other.calls) == ([], [], [])
        assert len(fake.messages(channel="C1", thread_ts="100.2")) == 1


@pytest.mark.e2e
def test_finbot_run_answers_a_question_interrupted_by_a_crash(tmp_path, tiny_checkpoint):
    database = tmp_path / "finbot.db"
    url = f"sqlite:///{database}"
    upgrade_database(url)
    engine = create_db_engine(url)
    session_factory = make_session_factory(engine)
    with FakeSlack() as fake:
        client = WebClient(base_url=fake.api_url, token=fake.bot_token)
        placeholder = client.chat_postMessage(channel="C1", thread_ts="500.1", text="답변을 준비하고 있어요…")["ts"]
        question = _question(session_factory, "500.1", "generating", timedelta(minutes=2), reply_ts=placeholder)
        stale = _question(session_factory, "600.1", "received", timedelta(hours=3))
        log = tmp_path / "finbot.log"
        process = start_finbot(
            "run", cwd=tmp_path, log_path=log,
            SLACK_BOT_TOKEN=fake.bot_token, SLACK_APP_TOKEN=fake.app_token, SLACK_API_URL=fake.api_url,
            DATABASE_URL=url, ENGINE="fake", BASE_MODEL=str(tiny_checkpoint.base_dir),
            FAKE_REPLY="복구된 답변: {question}", RECOVERY_MIN_AGE_S="0",
        )
        try:
            fake.wait_for(
                lambda: "복구된 답변" in fake.messages(channel="C1", thread_ts="500.1")[-1]["text"],
                timeout=60, description="recovered answer in place of the placeholder",
            )
            fake.wait_for(
                lambda: fake.messages(channel="C1", thread_ts="600.1"), timeout=30, description="apology"
            )
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text(errors="replace")
        thread = fake.messages(channel="C1", thread_ts="500.1")
        assert len(thread) == 1 and "질문 500.1" in thread[0]["text"]  # the placeholder itself was completed
        assert [m["text"] for m in fake.messages(channel="C1", thread_ts="600.1")] == [ANSWER_INTERRUPTED]
        with session_factory() as session:
            assert session.get(Message, question).status == "answered"
            assert session.get(Message, stale).status == "failed"
    engine.dispose()


@pytest.mark.e2e
def test_sigterm_stops_within_the_deadline_and_leaves_the_question_for_recovery(tmp_path, tiny_checkpoint):
    import sqlite3
    import time

    database = tmp_path / "finbot.db"
    log = tmp_path / "finbot.log"
    with FakeSlack() as fake:
        process = start_finbot(
            "run", cwd=tmp_path, log_path=log,
            SLACK_BOT_TOKEN=fake.bot_token, SLACK_APP_TOKEN=fake.app_token, SLACK_API_URL=fake.api_url,
            DATABASE_URL=f"sqlite:///{database}", ENGINE="fake", BASE_MODEL=str(tiny_checkpoint.base_dir),
            FAKE_REPLY="아주 " * 200, FAKE_TOKENS_PER_SECOND="5", SHUTDOWN_DEADLINE_S="1",
        )
        try:
            fake.wait_connected(timeout=60)
            mention = fake.mention_event("느린 답변", channel="C1")
            fake.send_event(mention)
            fake.wait_for(
                lambda: sqlite3.connect(database).execute(
                    "select count(*) from messages where status='generating'").fetchone()[0] == 1,
                timeout=30, description="generation started",
            )
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
            assert time.monotonic() - started < 8
        finally:
            if process.poll() is None:
                process.kill()
    output = log.read_text(errors="replace")
    assert "shutdown deadline" in output
    statuses = sqlite3.connect(database).execute("select status from messages").fetchall()
    assert statuses == [("generating",)]  # kept for the next start's recovery
