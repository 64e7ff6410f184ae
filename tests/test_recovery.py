"""Leases and the recovery sweep: abandoned questions are finished exactly once, live ones are left alone.

Runs on every backend of the `session_factory` fixture (a SQLite file and a real PostgreSQL).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from slack_sdk import WebClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from bot.instance import current_instance_id, owner_is_gone
from bot.messages_ko import ANSWER_GAVE_UP, ANSWER_INTERRUPTED
from bot.recovery import RecoveryLoop
from storage.conversations import ConversationStore, LeaseLostError
from storage.db import create_db_engine, make_session_factory
from storage.leases import QuestionLeases
from storage.models import Message, utcnow
from storage.questions import QuestionStore
from tests.fakes.slack_server import FakeSlack

LEASE = timedelta(seconds=30)
ELSEWHERE = "other-host:4242:123@1"  # an owner on another machine: only its lease can tell it is gone


class RecordingAnswers:
    """What RecoveryLoop needs of AnswerService; records the questions it is asked to answer again."""

    def __init__(self, session_factory: sessionmaker[Session], active: set[int] | None = None) -> None:
        self.questions = QuestionStore(session_factory)
        self.calls: list[int] = []
        self._active = active or set()

    def active_questions(self) -> set[int]:
        return set(self._active)

    def answer_stored(self, client: WebClient, message_id: int) -> None:
        self.calls.append(message_id)


def _question(
    session_factory: sessionmaker[Session],
    thread_ts: str,
    *,
    owner: str | None,
    lease_left: timedelta | None,
    age: timedelta = timedelta(seconds=5),
    status: str = "generating",
    reply_ts: str | None = None,
    attempts: int = 0,
) -> int:
    stored = ConversationStore(session_factory).store_question("T0001", "C1", thread_ts, f"질문 {thread_ts}", "U1", thread_ts)
    assert stored is not None
    now = utcnow()
    with session_factory() as session:
        session.execute(
            update(Message).where(Message.id == stored[1]).values(
                status=status, owner=owner, created_at=now - age, reply_ts=reply_ts, attempts=attempts,
                lease_expires_at=None if lease_left is None else now + lease_left,
            )
        )
        session.commit()
    return stored[1]


def _statuses(session_factory: sessionmaker[Session]) -> dict[int, str]:
    with session_factory() as session:
        return dict(session.query(Message.id, Message.status).all())


def _dead_local_owner() -> str:
    """The instance id a process of this machine had, after that process has exited."""
    child = subprocess.run(
        ["python3", "-c", "import bot.instance as i; print(i.current_instance_id())"],
        capture_output=True, text=True, check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]),
    )
    return child.stdout.strip()


def test_a_dead_process_of_this_machine_is_gone_a_live_one_or_another_machine_is_not():
    dead = _dead_local_owner()
    assert dead != current_instance_id()
    assert owner_is_gone(dead)
    assert not owner_is_gone(current_instance_id())
    assert not owner_is_gone(ELSEWHERE)
    assert not owner_is_gone("not an instance id")


def test_the_sweep_takes_over_exactly_the_abandoned_questions(session_factory):
    dead = _dead_local_owner()
    with FakeSlack() as fake:
        client = WebClient(base_url=fake.api_url, token=fake.bot_token)
        placeholder = client.chat_postMessage(channel="C1", thread_ts="100.1", text="반쯤 쓴 답변 ▍")["ts"]
        expired = _question(session_factory, "200.1", owner=ELSEWHERE, lease_left=-timedelta(seconds=1))
        live_elsewhere = _question(session_factory, "200.2", owner=ELSEWHERE, lease_left=timedelta(seconds=20))
        killed_here = _question(session_factory, "200.3", owner=dead, lease_left=timedelta(seconds=25), status="received")
        legacy_old = _question(session_factory, "200.4", owner=None, lease_left=None, age=timedelta(minutes=5))
        legacy_fresh = _question(session_factory, "200.5", owner=None, lease_left=None, age=timedelta(seconds=10))
        too_old = _question(session_factory, "100.1", owner=ELSEWHERE, lease_left=-LEASE, age=timedelta(hours=2),
                            reply_ts=placeholder)
        poison = _question(session_factory, "300.1", owner=ELSEWHERE, lease_left=-LEASE, attempts=3)
        answered = _question(session_factory, "300.2", owner=ELSEWHERE, lease_left=-LEASE, status="answered")
        failed = _question(session_factory, "300.3", owner=ELSEWHERE, lease_left=-LEASE, status="failed")

        leases = QuestionLeases(session_factory, "me:1:1@1", LEASE)
        answers = RecordingAnswers(session_factory)
        loop = RecoveryLoop(leases, answers, client, max_age=timedelta(minutes=30), max_attempts=3,
                            legacy_min_age=timedelta(minutes=2))
        result = loop.sweep()

        assert sorted(result.reanswered) == sorted(answers.calls) == sorted([expired, killed_here, legacy_old])
        assert sorted(result.apologised) == sorted([too_old, poison])
        # The apology replaced the half-written message instead of appearing beside it.
        assert [m["text"] for m in fake.messages(channel="C1", thread_ts="100.1")] == [ANSWER_INTERRUPTED]
        assert [m["text"] for m in fake.messages(channel="C1", thread_ts="300.1")] == [ANSWER_GAVE_UP]
        statuses = _statuses(session_factory)
        assert statuses[too_old] == statuses[poison] == "failed"
        assert statuses[live_elsewhere] == "generating" and statuses[legacy_fresh] == "generating"
        assert statuses[answered] == "answered" and statuses[failed] == "failed"
        with session_factory() as session:
            taken = session.get(Message, expired)
            assert (taken.owner, taken.status, taken.attempts) == ("me:1:1@1", "received", 1)
            assert taken.lease_expires_at > utcnow() + LEASE - timedelta(seconds=5)

        # Another instance sweeping right after finds nothing left: every question had one taker.
        other = RecordingAnswers(session_factory)
        again = RecoveryLoop(QuestionLeases(session_factory, "you:2:2@1", LEASE), other, client,
                             max_age=timedelta(minutes=30), legacy_min_age=timedelta(minutes=2)).sweep()
        assert (again.reanswered, again.apologised, other.calls) == ([], [], [])
        assert len(fake.messages(channel="C1", thread_ts="300.1")) == 1


def test_a_renewed_lease_is_never_taken_and_a_released_one_is_taken_at_once(session_factory):
    owner = QuestionLeases(session_factory, "owner:1:1@1", timedelta(seconds=2))
    store = ConversationStore(session_factory)
    stored = store.store_question("T0001", "C1", "1.1", "질문", "U1", "1.1", owner=owner.owner,
                                  lease_until=owner.lease_until())
    assert stored is not None
    question_id = stored[1]
    taker = QuestionLeases(session_factory, "taker:2:2@1", LEASE)
    later = utcnow() + timedelta(seconds=3)
    found = taker.abandoned(now=later, legacy_before=later)
    assert [q.id for q in found] == [question_id]
    # The owner renews between the taker's read and its UPDATE: the takeover must fail.
    assert owner.renew(now=later) == 1
    assert not taker.take_over(found[0], owner_gone=False, now=later)
    # Released at shutdown: taken at once, no lease to wait for.
    assert owner.release() == 1
    now = utcnow() + timedelta(milliseconds=1)
    released = taker.abandoned(now=now, legacy_before=now - timedelta(minutes=2))
    assert [q.id for q in released] == [question_id]
    assert taker.take_over(released[0], owner_gone=False, now=now)
    # The old owner can neither start nor store an answer for a question it lost.
    with pytest.raises(LeaseLostError):
        store.start_answer(question_id, stored[0], owner=owner.owner)
    with pytest.raises(LeaseLostError):
        store.add_assistant_message(stored[0], "늦은 답변", reply_to_id=question_id, slack_ts=None, owner=owner.owner)
    store.start_answer(question_id, stored[0], owner=taker.owner)
    store.add_assistant_message(stored[0], "답변", reply_to_id=question_id, slack_ts=None, owner=taker.owner)
    assert _statuses(session_factory)[question_id] == "answered"
    assert taker.abandoned(now=utcnow() + timedelta(hours=1), legacy_before=utcnow()) == []


@pytest.fixture
def second_factory(session_factory: sessionmaker[Session]) -> Iterator[sessionmaker[Session]]:
    """A second instance: its own engine and pool on the same database."""
    engine = create_db_engine(session_factory.kw["bind"].url.render_as_string(hide_password=False))
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def test_concurrent_sweeps_of_several_instances_answer_each_question_once(session_factory, second_factory):
    ids = [_question(session_factory, f"{400 + i}.1", owner=ELSEWHERE, lease_left=-LEASE) for i in range(5)]
    barrier = threading.Barrier(6)
    calls: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def sweep(index: int) -> None:
        factory = session_factory if index % 2 else second_factory
        answers = RecordingAnswers(factory)
        loop = RecoveryLoop(QuestionLeases(factory, f"i{index}:1:1@1", LEASE), answers,
                            WebClient(base_url="http://127.0.0.1:9/"), max_age=timedelta(minutes=30))
        barrier.wait()
        try:
            loop.sweep()
        except BaseException as error:  # noqa: BLE001 - reported below with its cause
            errors.append(error)
        with lock:
            calls.extend((f"i{index}", call) for call in answers.calls)

    threads = [threading.Thread(target=sweep, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(call for _, call in calls) == sorted(ids)
