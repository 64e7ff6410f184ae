"""The retention purge on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from sqlalchemy import func, select, update

from storage.conversations import ConversationStore
from storage.models import Conversation, Feedback, Message, ProcessedEvent
from storage.retention import RETENTION_JOB_ID, purge_expired, schedule_retention

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _thread(store: ConversationStore, session_factory, thread_ts: str, age: timedelta) -> int:
    stored = store.store_question("T1", "C1", thread_ts, "질문", "U1", thread_ts)
    assert stored is not None
    conversation_id, question = stored
    answer = store.add_assistant_message(conversation_id, "답", question, thread_ts + "9")
    with session_factory() as session:
        session.add(Feedback(message_id=answer, slack_user="U2", vote=1))
        session.execute(update(Conversation).where(Conversation.id == conversation_id).values(updated_at=NOW - age))
        session.commit()
    return conversation_id


def _count(session_factory, model) -> int:
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_purge_deletes_old_conversations_with_their_messages_and_old_event_ids(session_factory):
    store = ConversationStore(session_factory)
    old = _thread(store, session_factory, "100.1", timedelta(days=91))
    _thread(store, session_factory, "100.2", timedelta(days=120))
    recent = _thread(store, session_factory, "200.1", timedelta(days=89))
    with session_factory() as session:
        session.add_all([
            ProcessedEvent(event_id="EvOld", received_at=NOW - timedelta(days=8)),
            ProcessedEvent(event_id="EvNew", received_at=NOW - timedelta(hours=1)),
        ])
        session.commit()

    result = purge_expired(session_factory, now=NOW, days=90, event_days=7, batch_size=1)

    assert (result.conversations, result.processed_events) == (2, 1)
    with session_factory() as session:
        assert session.scalars(select(Conversation.id)).all() == [recent]
        assert set(session.scalars(select(Message.conversation_id)).all()) == {recent}
        assert session.scalars(select(ProcessedEvent.event_id)).all() == ["EvNew"]
    assert _count(session_factory, Feedback) == 1
    assert store.messages(old) == []
    # Idempotent: a second run (or a second instance) finds nothing.
    assert purge_expired(session_factory, now=NOW, days=90, event_days=7).conversations == 0


def test_zero_days_keeps_conversations(session_factory):
    store = ConversationStore(session_factory)
    _thread(store, session_factory, "100.1", timedelta(days=4000))
    assert purge_expired(session_factory, now=NOW, days=0).conversations == 0
    assert _count(session_factory, Conversation) == 1


def test_naive_now_is_refused(session_factory):
    with pytest.raises(ValueError):
        purge_expired(session_factory, now=datetime(2026, 1, 1), days=90)


def test_scheduled_daily():
    from bot.scheduler import FinbotScheduler

    scheduler = FinbotScheduler("Asia/Seoul")
    assert schedule_retention(scheduler, session_factory=None, days=90, event_days=7, at=time(4, 30)) is True
    job = scheduler._scheduler.get_job(RETENTION_JOB_ID)
    assert job is not None
    fields = {field.name: str(field) for field in job.trigger.fields}
    assert (fields["hour"], fields["minute"]) == ("4", "30")


def test_not_scheduled_when_switched_off():
    from bot.scheduler import FinbotScheduler

    scheduler = FinbotScheduler("Asia/Seoul")
    assert schedule_retention(scheduler, session_factory=None, days=0, event_days=0) is False
    assert scheduler._scheduler.get_job(RETENTION_JOB_ID) is None
    # Event ids alone still need purging.
    assert schedule_retention(scheduler, session_factory=None, days=0, event_days=7) is True
    assert scheduler._scheduler.get_job(RETENTION_JOB_ID) is not None
