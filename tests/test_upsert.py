"""Writers racing on one key (two /용어 lookups of a new term, double clicks, two operators) on
SQLite and PostgreSQL: none of them may fail, and the last write wins.

Each "instance" has its own engine and pool, like separate bot processes; a barrier releases all
threads at once so that their SELECT-then-INSERT windows overlap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.conversations import ConversationStore
from storage.db import create_db_engine, make_session_factory
from storage.feedback import FeedbackStore
from storage.models import Feedback, QAChannel, TermLookup
from storage.qa_channels import QAChannelStore
from storage.term_lookups import TermLookupStore
from storage.term_posts import TermPostStore

THREADS = 6


@pytest.fixture
def factories(database_url: str, session_factory: sessionmaker[Session]) -> Iterator[list[sessionmaker[Session]]]:
    """Two session factories on separate engines over the same migrated database."""
    engines: list[Engine] = [create_db_engine(database_url) for _ in range(2)]
    try:
        yield [make_session_factory(engine) for engine in engines]
    finally:
        for engine in engines:
            engine.dispose()


def _race(job: Callable[[int], Any], threads: int = THREADS) -> list[Any]:
    """Run `job(index)` in `threads` threads released together; re-raise the first error."""
    barrier = threading.Barrier(threads)
    results: list[Any] = [None] * threads
    errors: list[BaseException] = []

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = job(index)
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def test_put_replaces_the_stored_answer(session_factory: sessionmaker[Session]) -> None:
    store = TermLookupStore(session_factory)
    store.put("금리", "금리", "first")
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    with session_factory.begin() as session:  # the first answer is old (about to expire)
        session.get_one(TermLookup, "금리").created_at = long_ago
    store.put("금리", "금리 ", "second")
    second = store.get("금리")
    assert second is not None
    assert (second.term, second.answer) == ("금리 ", "second")
    # A regenerated answer starts a new lifetime.
    assert second.created_at > long_ago + timedelta(days=365)


def test_concurrent_puts_of_one_new_term_all_succeed(factories: list[sessionmaker[Session]]) -> None:
    stores = [TermLookupStore(factory) for factory in factories]
    for round_ in range(5):
        key = f"term-{round_}"
        _race(lambda index, key=key: stores[index % 2].put(key, key, f"answer-{index}"))
        stored = stores[0].get(key)
        assert stored is not None and stored.answer in {f"answer-{i}" for i in range(THREADS)}
    # Sequential puts after the race: the last one wins.
    stores[1].put("term-0", "term-0", "final")
    final = stores[0].get("term-0")
    assert final is not None and final.answer == "final"


def _answer(session_factory: sessionmaker[Session]) -> int:
    conversations = ConversationStore(session_factory)
    stored = conversations.store_question("T1", "C1", "100.1", "금리?", "U1", "100.1")
    assert stored is not None
    conversation_id, question_id = stored
    return conversations.add_assistant_message(conversation_id, "답", question_id, "100.2")


def _votes(session_factory: sessionmaker[Session]) -> list[tuple[int, str, int]]:
    with session_factory() as session:
        rows = session.execute(select(Feedback.message_id, Feedback.slack_user, Feedback.vote).order_by(Feedback.id))
        return [(row[0], row[1], row[2]) for row in rows]


def test_a_second_vote_changes_the_first(session_factory: sessionmaker[Session]) -> None:
    answer_id = _answer(session_factory)
    feedback = FeedbackStore(session_factory)
    assert feedback.vote(answer_id, "U2", 1) is True
    assert feedback.vote(answer_id, "U2", -1) is False
    assert feedback.vote(answer_id, "U3", -1) is True
    assert _votes(session_factory) == [(answer_id, "U2", -1), (answer_id, "U3", -1)]
    with session_factory() as session:
        created, updated = session.execute(
            select(Feedback.created_at, Feedback.updated_at).where(Feedback.slack_user == "U2")
        ).one()
    assert updated > created
    with pytest.raises(ValueError):
        feedback.vote(answer_id, "U2", 0)


def test_concurrent_first_clicks_store_one_vote(
    session_factory: sessionmaker[Session], factories: list[sessionmaker[Session]]
) -> None:
    answer_id = _answer(session_factory)
    stores = [FeedbackStore(factory) for factory in factories]
    results = _race(lambda index: stores[index % 2].vote(answer_id, "U2", 1 if index % 2 else -1))
    assert results.count(True) == 1 and results.count(False) == THREADS - 1
    [(message_id, user, vote)] = _votes(session_factory)
    assert (message_id, user) == (answer_id, "U2") and vote in (-1, 1)


def test_concurrent_pins_of_one_date_last_wins(factories: list[sessionmaker[Session]]) -> None:
    stores = [TermPostStore(factory) for factory in factories]
    day = date(2026, 2, 19)
    _race(lambda index: stores[index % 2].pin(day, f"term-{index}"))
    assert stores[0].pinned_term(day) in {f"term-{i}" for i in range(THREADS)}
    stores[1].pin(day, "환율")
    assert stores[0].pinned_term(day) == "환율"


def test_concurrent_qa_channel_adds_report_one_addition(factories: list[sessionmaker[Session]]) -> None:
    stores = [QAChannelStore(factory) for factory in factories]
    results = _race(lambda index: stores[index % 2].add("T1", "C1", f"U{index}"))
    assert results.count(True) == 1
    assert stores[0].add("T1", "C1", "U9") is False
    assert stores[1].is_qa_channel("T1", "C1")
    assert stores[0].remove("T1", "C1") is True
    assert stores[0].add("T1", "C1", "U9") is True
    with factories[0]() as session:
        assert session.scalar(select(func.count()).select_from(QAChannel)) == 1
