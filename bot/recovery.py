"""Crash recovery: questions a previous run left 'received' or 'generating' are not dropped.

On start-up, each interrupted question is either answered again in its thread (reusing the stored
reply message through `AnswerService.answer_stored`) or, when it is older than
RECOVERY_MAX_AGE_MINUTES (the user has long moved on), gets a short apology in its thread and is
marked failed.

Several instances may start at once on one database, and a running instance may be in the middle
of answering. So a question is only considered interrupted when it is older than `min_age`
(RECOVERY_MIN_AGE_S; a live instance finishes an answer well within it), and each one is claimed
with an atomic conditional UPDATE before anything is posted: exactly one instance recovers it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from slack_sdk import WebClient
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from bot import messages_ko
from bot.streaming import AnswerStreamer, ReplyTarget, StreamingModes, StreamSettings
from bot.term_of_day import default_instance_id
from storage.conversations import ConversationStore
from storage.models import Conversation, Message, utcnow

if TYPE_CHECKING:
    from bot.replies import AnswerService

logger = logging.getLogger(__name__)

CLAIM_PREFIX = "recovery claimed by "
PENDING = ("received", "generating")


@dataclass(frozen=True)
class RecoveryResult:
    reanswered: list[int]
    apologised: list[int]


@dataclass(frozen=True)
class _Pending:
    id: int
    status: str
    created_at: datetime
    reply_ts: str | None
    team_id: str
    channel_id: str
    thread_ts: str

    @property
    def target(self) -> ReplyTarget:
        return ReplyTarget(self.team_id, self.channel_id, self.thread_ts, None)


def _pending(session_factory: sessionmaker[Session], older_than: datetime) -> list[_Pending]:
    with session_factory() as session:
        rows = session.execute(
            select(Message, Conversation)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(
                Message.role == "user",
                Message.status.in_(PENDING),
                Message.created_at <= older_than,
                or_(Message.error.is_(None), Message.error.not_like(CLAIM_PREFIX + "%")),
            )
            .order_by(Message.id)
        ).all()
        return [
            _Pending(m.id, m.status, m.created_at, m.reply_ts, c.team_id, c.channel_id, c.thread_ts)
            for m, c in rows
        ]


def _claim(session_factory: sessionmaker[Session], question: _Pending, owner: str) -> bool:
    """Atomically take the question; False when another instance (or the live answer) got there first."""
    with session_factory() as session:
        result = session.execute(
            update(Message)
            .where(
                Message.id == question.id,
                Message.status == question.status,
                or_(Message.error.is_(None), Message.error.not_like(CLAIM_PREFIX + "%")),
            )
            .values(status="received", error=f"{CLAIM_PREFIX}{owner}")
        )
        session.commit()
        return result.rowcount == 1


def _apologise(client: WebClient, question: _Pending) -> None:
    """The notice replaces the stored reply message (placeholder or half an answer), else is posted."""
    streamer = AnswerStreamer(
        client, question.target, StreamingModes(native_enabled=False), StreamSettings(), placeholder_ts=question.reply_ts
    )
    streamer.fail(messages_ko.ANSWER_INTERRUPTED)


def recover_interrupted(
    session_factory: sessionmaker[Session],
    answers: AnswerService,
    client: WebClient,
    *,
    max_age: timedelta,
    min_age: timedelta = timedelta(0),
    now: datetime | None = None,
    owner: str | None = None,
) -> RecoveryResult:
    """Re-answer (younger than `max_age`) or apologise for every interrupted question older than `min_age`."""
    now = now or utcnow()
    owner = owner or default_instance_id()
    store = ConversationStore(session_factory)
    reanswered: list[int] = []
    apologised: list[int] = []
    for question in _pending(session_factory, now - min_age):
        if not _claim(session_factory, question, owner):
            continue
        if now - question.created_at > max_age:
            logger.warning(
                "question %d in %s was interrupted %s ago; telling the user to ask again",
                question.id, question.target.thread_ref, now - question.created_at,
            )
            _apologise(client, question)
            store.set_status(question.id, "failed", "interrupted by a restart")
            apologised.append(question.id)
            continue
        logger.info("re-answering question %d in %s, interrupted by a restart", question.id, question.target.thread_ref)
        try:
            answers.answer_stored(client, question.id)
        except Exception:
            logger.exception("could not resubmit question %d in %s", question.id, question.target.thread_ref)
            continue
        reanswered.append(question.id)
    if reanswered or apologised:
        logger.info("recovery: %d question(s) re-answered, %d apologised for", len(reanswered), len(apologised))
    return RecoveryResult(reanswered=reanswered, apologised=apologised)


def recover_on_startup(settings: object, finbot: object) -> RecoveryResult | None:
    """`finbot run`'s start-up pass (settings: FinbotSettings, finbot: bot.app.Finbot); never raises."""
    try:
        return recover_interrupted(
            finbot.session_factory,  # type: ignore[attr-defined]
            finbot.answers,  # type: ignore[attr-defined]
            finbot.app.client,  # type: ignore[attr-defined]
            max_age=timedelta(minutes=settings.recovery_max_age_minutes),  # type: ignore[attr-defined]
            min_age=timedelta(seconds=settings.recovery_min_age_s),  # type: ignore[attr-defined]
        )
    except Exception:
        logger.exception("crash recovery failed; interrupted questions stay stored for the next start")
        return None


def finish_in_flight(answers: AnswerService, deadline_s: float) -> None:
    """Graceful shutdown: wait up to `deadline_s` for answers in flight, then stop regardless.

    Questions still unanswered at the deadline stay 'received'/'generating' in the database and
    are recovered by the next start (or by another instance's start-up pass). Past the deadline
    the process exits at once: worker threads blocked in generation would otherwise hold the
    interpreter open.
    """
    import threading

    done = threading.Event()

    def wait_for_answers() -> None:
        answers.shutdown(wait=True)
        done.set()

    threading.Thread(target=wait_for_answers, name="finbot-shutdown", daemon=True).start()
    if done.wait(deadline_s):
        return
    logger.warning(
        "answers still in flight after the %.0f s shutdown deadline; exiting, they are recovered on the next start",
        deadline_s,
    )
    logging.shutdown()
    os._exit(0)
