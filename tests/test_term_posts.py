"""TermPostStore against a real, migrated database: the (channel, date) claim is the exactly-once guard.

Runs on every backend of the `database_url` fixture (tests/postgres.py): a SQLite file and a real
PostgreSQL server.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage.db import create_db_engine, make_session_factory, upgrade_database
from storage.term_posts import TermPostStore

DAY = date(2026, 2, 19)
T0 = datetime(2026, 2, 19, 0, 0, tzinfo=UTC)  # 09:00 in Seoul


@pytest.fixture
def migrated_url(database_url: str) -> str:
    upgrade_database(database_url)
    return database_url


def _factory(url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@pytest.fixture
def store(migrated_url: str) -> Iterator[TermPostStore]:
    for factory in _factory(migrated_url):
        yield TermPostStore(factory)


@pytest.fixture
def other_store(migrated_url: str) -> Iterator[TermPostStore]:
    """A second instance: its own engine and connection pool on the same database."""
    for factory in _factory(migrated_url):
        yield TermPostStore(factory)


def claim(store: TermPostStore, by: str, now: datetime = T0, stale_before: datetime | None = None, channel: str = "C1"):
    return store.claim(
        channel, DAY, term="기준금리", term_key="기준금리", category="통화정책", claimed_by=by, now=now,
        stale_before=stale_before,
    )


def test_only_the_first_claim_wins_across_instances(store: TermPostStore, other_store: TermPostStore):
    first = claim(store, "a")
    assert first is not None and not first.taken_over and first.post.status == "claimed"
    assert claim(other_store, "b") is None
    assert claim(store, "a") is None  # a retried job of the same instance too
    # Another channel on the same day is a separate claim.
    assert claim(other_store, "b", channel="C2") is not None
    assert store.get("C1", DAY).claimed_by == "a"


def test_concurrent_claims_from_threads_have_one_winner(store: TermPostStore, other_store: TermPostStore):
    barrier = threading.Barrier(8)
    results: list[object] = []
    lock = threading.Lock()

    def contend(index: int) -> None:
        target = store if index % 2 else other_store
        barrier.wait()
        try:
            result: object = claim(target, f"worker-{index}")
        except Exception as error:  # noqa: BLE001 - reported by the assertion below, with its cause
            result = error
        with lock:
            results.append(result)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == []
    winners = [r for r in results if r is not None]
    assert len(results) == 8 and len(winners) == 1


def test_a_stale_claim_is_taken_over_once_and_a_fresh_one_never(store: TermPostStore, other_store: TermPostStore):
    assert claim(store, "crashed", now=T0) is not None
    cutoff = T0 + timedelta(minutes=1)
    # Not yet stale: the cutoff lies before the claim.
    assert claim(other_store, "b", now=T0 + timedelta(seconds=30), stale_before=T0 - timedelta(minutes=1)) is None
    taken = claim(other_store, "b", now=T0 + timedelta(minutes=31), stale_before=cutoff)
    assert taken is not None and taken.taken_over and taken.post.claimed_by == "b"
    # The returned post is the row as the takeover left it, the crashed owner's term included.
    assert (taken.post.claimed_at, taken.post.status, taken.post.term) == (T0 + timedelta(minutes=31), "claimed", "기준금리")
    # The takeover refreshed claimed_at, so a third instance with the same cutoff cannot take it again.
    assert claim(store, "c", now=T0 + timedelta(minutes=32), stale_before=cutoff) is None
    # The crashed owner, should it wake up, can neither confirm nor record its post.
    assert not store.confirm_claim(taken.post.id, "crashed", T0 + timedelta(minutes=33))
    assert not store.mark_posted(taken.post.id, "crashed", slack_ts="1.0", explanation="x", now=T0)
    assert other_store.confirm_claim(taken.post.id, "b", T0 + timedelta(minutes=33))
    assert other_store.mark_posted(taken.post.id, "b", slack_ts="2.0", explanation="설명", now=T0)
    # A posted day is never taken over, however old.
    assert claim(store, "d", now=T0 + timedelta(days=1), stale_before=T0 + timedelta(days=1)) is None
    posted = store.get("C1", DAY)
    assert (posted.status, posted.slack_ts, posted.explanation) == ("posted", "2.0", "설명")


def test_failed_is_final_and_history_is_per_channel_in_date_order(store: TermPostStore):
    for offset, term in [(2, "환율"), (0, "기준금리"), (1, "양적완화")]:
        day = DAY - timedelta(days=10 - offset)
        store.claim("C1", day, term=term, term_key=term, category=None, claimed_by="a", now=T0)
    store.claim("C2", DAY - timedelta(days=5), term="국채", term_key="국채", category=None, claimed_by="a", now=T0)
    assert store.channel_history("C1", before=DAY) == ["기준금리", "양적완화", "환율"]
    assert store.channel_history("C1", before=DAY - timedelta(days=9)) == ["기준금리"]
    assert store.channel_history("C2", before=DAY) == ["국채"]

    today = claim(store, "a")
    assert store.mark_failed(today.post.id, "a", "Slack post failed: channel_not_found")
    assert claim(store, "b", now=T0 + timedelta(hours=5), stale_before=T0 + timedelta(hours=5)) is None
    assert store.get("C1", DAY).status == "failed"
    assert [p.post_date for p in store.history("C1")][0] == DAY


def test_pins_can_be_set_and_replaced(store: TermPostStore, other_store: TermPostStore):
    assert store.pinned_term(DAY) is None
    store.pin(DAY, "환율")
    other_store.pin(DAY, "기준금리")
    assert store.pinned_term(DAY) == "기준금리"
    assert store.pinned_term(DAY + timedelta(days=1)) is None
