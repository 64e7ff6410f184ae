"""What the App Home tab reads and stores (issue 13), on SQLite and PostgreSQL: a user's questions,
the week's counts, the worst-rated answers, answer timings, admins' stored settings, Q&A channels
and pins; and the readiness probe's view of the database."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import delete, update

from storage.answer_timings import AnswerTimingStore
from storage.conversations import ConversationStore
from storage.feedback import FeedbackStore
from storage.health import DatabaseProbe
from storage.models import Feedback, Message, utcnow
from storage.qa_channels import QAChannelStore
from storage.questions import QuestionStore
from storage.stored_settings import StoredSettingStore
from storage.term_posts import TermPostStore


def _ask(store: ConversationStore, channel: str, user: str | None, text: str, ts: str, answer: str | None = None):
    conversation_id, question_id = store.store_question("T1", channel, ts, text, user, ts)
    answer_id = None
    if answer is not None:
        answer_id = store.add_assistant_message(conversation_id, answer, reply_to_id=question_id, slack_ts=None)
        store.set_status(question_id, "answered")
    return question_id, answer_id


def test_a_users_recent_questions_and_the_weeks_counts(session_factory):
    store, questions = ConversationStore(session_factory), QuestionStore(session_factory)
    _ask(store, "C1", "U1", "첫 질문", "100.000001", answer="답")
    _ask(store, "C1", "U2", "남의 질문", "100.000002")
    failed, _ = _ask(store, "C2", "U1", "둘째 질문", "100.000003")
    store.set_status(failed, "failed", "engine error")
    _ask(store, "C3", None, "기준금리가 뭐야?", "100.000004", answer="설명")  # the term of the day's, no person

    recent = questions.recent_by_user("T1", "U1", limit=5)
    assert [(q.channel_id, q.slack_ts, q.text, q.status) for q in recent] == [
        ("C2", "100.000003", "둘째 질문", "failed"),
        ("C1", "100.000001", "첫 질문", "answered"),
    ]
    assert questions.recent_by_user("T2", "U1") == []  # another workspace
    assert questions.counts_since(utcnow() - timedelta(days=7)) == {"answered": 1, "received": 1, "failed": 1}
    assert questions.counts_since(utcnow() + timedelta(seconds=1)) == {}


def test_votes_of_the_week_and_the_worst_rated_answers_first(session_factory):
    store, feedback = ConversationStore(session_factory), FeedbackStore(session_factory)
    _, liked = _ask(store, "C1", "U1", "좋은 답", "200.000001", answer="a")
    _, mixed = _ask(store, "C1", "U1", "애매한 답", "200.000002", answer="b")
    _, disliked = _ask(store, "C2", "U1", "나쁜 답", "200.000003", answer="c")
    _, old = _ask(store, "C2", "U1", "예전 답", "200.000004", answer="d")
    feedback.vote(liked, "U2", 1)
    feedback.vote(mixed, "U2", 1)
    feedback.vote(mixed, "U3", -1)
    feedback.vote(disliked, "U2", -1)
    feedback.vote(disliked, "U3", -1)
    feedback.vote(old, "U2", -1)
    with session_factory() as session:  # a vote from three weeks ago is out of the window
        session.execute(update(Feedback).where(Feedback.message_id == old).values(updated_at=utcnow() - timedelta(days=21)))
        session.commit()

    week = utcnow() - timedelta(days=7)
    assert feedback.counts_since(week) == (2, 3)
    worst = feedback.worst_rated(week, limit=5)
    assert [(a.answer_id, a.question, a.ups, a.downs) for a in worst] == [
        (disliked, "나쁜 답", 0, 2),
        (mixed, "애매한 답", 1, 1),
    ]
    assert (worst[0].channel_id, worst[0].thread_ts, worst[0].question_ts) == ("C2", "200.000003", "200.000003")


def test_answer_timings_median_and_retention_cascade(session_factory):
    store, timings = ConversationStore(session_factory), AnswerTimingStore(session_factory)
    ids = [_ask(store, "C1", "U1", f"질문 {i}", f"300.00000{i}", answer="a")[0] for i in range(3)]
    assert timings.median_first_text_ms(utcnow() - timedelta(days=7)) is None
    for question_id, first_text_ms in zip(ids, (300, 900, 500), strict=True):
        timings.record(question_id, first_text_ms=first_text_ms, answer_ms=first_text_ms * 4, tokens=40)
    timings.record(ids[1], first_text_ms=100, answer_ms=400, tokens=40)  # answered again: the latest counts
    assert timings.median_first_text_ms(utcnow() - timedelta(days=7)) == 300
    assert timings.median_first_text_ms(utcnow() + timedelta(seconds=1)) is None
    with session_factory() as session:  # deleting a question (retention) takes its timing along
        session.execute(delete(Message).where(Message.id == ids[2]))
        session.commit()
    assert timings.median_first_text_ms(utcnow() - timedelta(days=7)) == 200  # median of 300 and 100


def test_stored_settings_override_until_reset(session_factory):
    settings = StoredSettingStore(session_factory)
    assert settings.values(["a", "b"]) == {}
    settings.set("a", "C1,C2", "UADMIN")
    settings.set("a", "C3", "UADMIN2")  # a second change replaces the first
    settings.set("b", "09:30", None)
    assert settings.values(["a", "b", "c"]) == {"a": "C3", "b": "09:30"}
    assert settings.reset(["a", "c"]) == 1
    assert settings.values(["a", "b"]) == {"b": "09:30"}


def test_qa_channels_of_a_workspace_and_pins_from_a_date(session_factory):
    channels = QAChannelStore(session_factory)
    channels.add("T1", "C1", "U1")
    channels.add("T1", "C2", "U1")
    channels.add("T2", "C9", "U1")
    assert channels.channels("T1") == ["C1", "C2"]
    posts = TermPostStore(session_factory)
    posts.pin(date(2026, 3, 2), "환율")
    posts.pin(date(2026, 3, 5), "금리")
    posts.pin(date(2026, 3, 4), "채권")
    assert posts.pins_from(date(2026, 3, 3)) == [(date(2026, 3, 4), "채권"), (date(2026, 3, 5), "금리")]
    assert posts.unpin(date(2026, 3, 4))
    assert not posts.unpin(date(2026, 3, 4))
    assert posts.pins_from(date(2026, 3, 3)) == [(date(2026, 3, 5), "금리")]


def test_the_readiness_probe_reads_a_migrated_database_and_fails_on_one_that_is_not(database_url):
    from storage.db import upgrade_database

    probe = DatabaseProbe(database_url)
    try:
        with pytest.raises(Exception):  # noqa: B017 - the driver's own error (no table / no database)
            probe.check()
        upgrade_database(database_url)
        probe.check()
    finally:
        probe.close()
