"""ConversationStore against a real, migrated database: a SQLite file and a PostgreSQL server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.conversations import ConversationStore
from storage.db import create_db_engine, make_session_factory, upgrade_database
from storage.models import Conversation, Message, ProcessedEvent


@pytest.fixture
def db_url(database_url: str) -> str:
    upgrade_database(database_url)
    return database_url


@pytest.fixture
def engine(db_url: str):
    engine = create_db_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def store(session_factory: sessionmaker[Session]) -> ConversationStore:
    return ConversationStore(session_factory)


def _ask(store: ConversationStore, thread_ts: str, question: str, ts: str | None, team: str = "T1",
         channel: str = "C1") -> tuple[int, int]:
    """Store a question in thread `thread_ts`; (conversation id, message id)."""
    stored = store.store_question(team, channel, thread_ts, question, "U1", ts)
    assert stored is not None
    return stored


def _answered(store: ConversationStore, thread_ts: str, question: str, answer: str, ts: str) -> int:
    conversation_id, question_id = _ask(store, thread_ts, question, ts)
    store.add_assistant_message(conversation_id, answer, question_id, f"{ts}1")
    return question_id


def test_claim_event_only_once_even_from_a_second_process(store: ConversationStore, db_url: str) -> None:
    assert store.claim_event("Ev001") is True
    assert store.claim_event("Ev001") is False

    # A separate engine and session factory stand in for a second bot process on the same file.
    other_engine = create_db_engine(db_url)
    try:
        other = ConversationStore(make_session_factory(other_engine))
        assert other.claim_event("Ev001") is False
        assert other.claim_event("Ev002") is True
    finally:
        other_engine.dispose()
    assert store.claim_event("Ev002") is False
    assert store.claim_event("Ev003") is True


def test_store_question_creates_one_conversation_per_thread(store: ConversationStore, session_factory) -> None:
    assert store.find_conversation("T1", "C1", "100.1") is None
    first, _ = _ask(store, "100.1", "q1", "100.1")
    assert _ask(store, "100.1", "q2", "100.2")[0] == first
    assert store.find_conversation("T1", "C1", "100.1") == first
    # Any differing key part is a different thread.
    assert _ask(store, "100.2", "q", "100.2")[0] != first
    assert _ask(store, "100.1", "q", "100.1", channel="C2")[0] != first
    assert _ask(store, "100.1", "q", "100.1", team="T2")[0] != first
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Conversation)) == 4


def test_duplicate_question_returns_none(store: ConversationStore) -> None:
    conversation_id, first = _ask(store, "100.1", "금리가 뭐야?", "100.1")
    assert store.store_question("T1", "C1", "100.1", "금리가 뭐야?", "U1", "100.1") is None
    # Messages without a Slack ts never collide with each other.
    assert _ask(store, "100.1", "a", None) != _ask(store, "100.1", "b", None)
    # The same ts in another thread is a different message.
    other_id, _ = _ask(store, "200.1", "금리가 뭐야?", "100.1")
    assert other_id != conversation_id

    stored = store.messages(conversation_id)
    assert [(m.id == first, m.role, m.text, m.slack_ts, m.status) for m in stored] == [
        (True, "user", "금리가 뭐야?", "100.1", "received"),
        (False, "user", "a", None, "received"),
        (False, "user", "b", None, "received"),
    ]


def test_an_event_id_stores_its_question_once(store: ConversationStore) -> None:
    stored = store.store_question("T1", "C1", "100.1", "q", "U1", "100.1", event_id="Ev1")
    assert stored is not None
    # Slack's retry of the event, even with another ts, and a later claim of the same id.
    assert store.store_question("T1", "C1", "100.1", "q", "U1", "100.9", event_id="Ev1") is None
    assert store.claim_event("Ev1") is False
    assert [m.id for m in store.messages(stored[0])] == [stored[1]]


def test_status_transitions_and_answer_marks_question(store: ConversationStore) -> None:
    conversation_id, question_id = _ask(store, "100.1", "환율?", "100.1")
    store.set_status(question_id, "generating")
    assert store.messages(conversation_id)[0].status == "generating"
    store.set_status(question_id, "failed", error="timeout")
    assert store.messages(conversation_id)[0].status == "failed"

    answer_id = store.add_assistant_message(conversation_id, "1300원입니다.", question_id, "100.2")
    question, answer = store.messages(conversation_id)
    assert question.status == "answered"
    assert (answer.id, answer.role, answer.status, answer.reply_to_id) == (
        answer_id,
        "assistant",
        "answered",
        question_id,
    )

    with pytest.raises(ValueError):
        store.set_status(question_id, "bogus")
    with pytest.raises(LookupError):
        store.set_status(123456, "failed")
    with pytest.raises(ValueError):
        store.add_assistant_message(conversation_id, "x", answer_id, None)  # not a user message


def test_history_pairs_only_answered_questions_in_order(store: ConversationStore) -> None:
    q1 = _answered(store, "100.1", "q1", "a1", "101")
    conversation_id = store.find_conversation("T1", "C1", "100.1")
    assert conversation_id is not None
    _, unanswered = _ask(store, "100.1", "q-lost", "102")
    store.set_status(unanswered, "failed", error="boom")
    q3 = _answered(store, "100.1", "q3", "a3", "103")
    _answered(store, "900.1", "other-q", "other-a", "104")
    other_id = store.find_conversation("T1", "C1", "900.1")
    _, current = _ask(store, "100.1", "q-now", "105")

    assert store.history(conversation_id) == [("q1", "a1"), ("q3", "a3")]
    assert store.history(conversation_id, before_message_id=current) == [("q1", "a1"), ("q3", "a3")]
    assert store.history(conversation_id, before_message_id=q3) == [("q1", "a1")]
    assert store.history(conversation_id, before_message_id=q1) == []
    assert store.history(other_id) == [("other-q", "other-a")]


def test_deleting_conversation_cascades_messages(store: ConversationStore, session_factory) -> None:
    _answered(store, "100.1", "q1", "a1", "101")
    conversation_id = store.find_conversation("T1", "C1", "100.1")
    _answered(store, "200.1", "q2", "a2", "201")
    keep_id = store.find_conversation("T1", "C1", "200.1")

    # A Core DELETE bypasses ORM cascades, so only the database's ON DELETE CASCADE can remove them.
    with session_factory() as session:
        session.execute(delete(Conversation).where(Conversation.id == conversation_id))
        session.commit()
    with session_factory() as session:
        remaining = session.scalars(select(Message.conversation_id)).all()
    assert remaining == [keep_id, keep_id]
    assert store.messages(conversation_id) == []


def test_timestamps_are_timezone_aware_utc(store: ConversationStore, session_factory) -> None:
    before = datetime.now(UTC)
    store.claim_event("Ev-time")
    _answered(store, "100.1", "q1", "a1", "101")
    conversation_id = store.find_conversation("T1", "C1", "100.1")
    after = datetime.now(UTC)

    with session_factory() as session:
        conversation = session.get_one(Conversation, conversation_id)
        event = session.get_one(ProcessedEvent, "Ev-time")
        stamps = [conversation.created_at, conversation.updated_at, event.received_at]
    stamps += [m.created_at for m in store.messages(conversation_id)]
    for stamp in stamps:
        assert stamp.tzinfo is not None
        assert stamp.utcoffset() == timedelta(0)
        assert before <= stamp <= after
    # Adding messages bumps the conversation's updated_at (retention purges by it).
    assert conversation.updated_at >= max(m.created_at for m in store.messages(conversation_id))


def test_concurrent_claims_from_two_engines_have_one_winner(db_url: str) -> None:
    """Two "processes" (separate engines and pools) race for the same event ids at once."""
    from concurrent.futures import ThreadPoolExecutor

    engines = [create_db_engine(db_url), create_db_engine(db_url)]
    try:
        stores = [ConversationStore(make_session_factory(e)) for e in engines]
        event_ids = [f"EvRace{i}" for i in range(40)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(
                pool.map(lambda job: (job[1], stores[job[0]].claim_event(job[1])),
                         [(k, event_id) for event_id in event_ids for k in (0, 1, 0, 1)])
            )
    finally:
        for e in engines:
            e.dispose()
    winners: dict[str, int] = {}
    for event_id, won in results:
        winners[event_id] = winners.get(event_id, 0) + int(won)
    assert winners == {event_id: 1 for event_id in event_ids}


def test_stores_need_a_session_factory_bound_to_an_engine() -> None:
    # They run Core statements on the engine's connections; failing here beats failing mid-answer.
    from storage.questions import QuestionStore

    for store_class in (ConversationStore, QuestionStore):
        with pytest.raises(TypeError, match="make_session_factory"):
            store_class(sessionmaker())
