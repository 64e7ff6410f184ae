"""No question lost: leases renewed, abandoned questions taken over, shutdowns that hand work on.

Every question an instance stores is leased to it (storage.leases). A background loop in every
`finbot run`, from start-up on and every `interval_s`:

1. renews the leases of the questions this instance is answering or has queued;
2. takes over questions whose lease ran out (their instance was killed, lost its database or
   hangs), whose owner is a dead process of this machine (a kill followed by a restart: taken at
   once, not after the lease), or that were stored before leases existed. The takeover is one
   conditional UPDATE, so exactly one instance wins each question.

A question taken over is answered again in its thread, reusing its stored reply message (the
placeholder, the half-streamed answer or the "continuing shortly" notice), so no second answer
appears beside a half one. One older than `max_age` (the user has long moved on) or taken over
more than `max_attempts` times (it keeps killing whoever answers it) gets a short apology there
instead and is marked failed.

A graceful shutdown (`shut_down`) stops taking questions over, releases the queued ones at once,
gives running answers the shutdown deadline, then interrupts them: each closes its message with
a notice and releases its question, which the next start or another instance picks up at once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from slack_sdk import WebClient

from bot import messages_ko, metrics
from bot.instance import owner_is_gone
from bot.streaming import AnswerStreamer, ReplyTarget, StreamingModes, StreamSettings
from storage.conversations import ConversationStore
from storage.leases import QuestionLeases, UnfinishedQuestion
from storage.models import utcnow

if TYPE_CHECKING:
    from bot.replies import AnswerService

logger = logging.getLogger(__name__)


@dataclass
class RecoveryResult:
    reanswered: list[int] = field(default_factory=list)
    apologised: list[int] = field(default_factory=list)


def _apologise(client: WebClient, question: UnfinishedQuestion, text: str) -> None:
    """The notice replaces the stored reply message (placeholder or half an answer), else is posted."""
    target = ReplyTarget(question.team_id, question.channel_id, question.thread_ts, None)
    streamer = AnswerStreamer(
        client, target, StreamingModes(native_enabled=False), StreamSettings(), placeholder_ts=question.reply_ts
    )
    if streamer.fail(text) is None:
        raise RuntimeError(f"could not post the notice in {question.thread_ref}")


class RecoveryLoop:
    """Renews this instance's leases and finishes abandoned questions, every `interval_s`."""

    def __init__(
        self,
        leases: QuestionLeases,
        answers: AnswerService,
        client: WebClient,
        *,
        max_age: timedelta,
        max_attempts: int = 3,
        legacy_min_age: timedelta = timedelta(minutes=2),
        interval_s: float = 10.0,
        is_gone: Callable[[str], bool] = owner_is_gone,
    ) -> None:
        self._leases = leases
        self._answers = answers
        self._client = client
        self._store = ConversationStore(answers.questions.session_factory)
        self._max_age = max_age
        self._max_attempts = max_attempts
        self._legacy_min_age = legacy_min_age
        self._interval_s = interval_s
        self._is_gone = is_gone
        self._sweeping = threading.Event()
        self._sweeping.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ one pass

    def tick(self, now: datetime | None = None) -> RecoveryResult:
        """Renew our leases, then (unless shutting down) take over abandoned questions; never raises."""
        try:
            self._leases.renew(now)
        except Exception as error:
            logger.warning("could not renew question leases (retrying in %.0f s): %s", self._interval_s, error)
        try:
            self._answers.store_unsaved_answers()
        except Exception as error:  # noqa: BLE001 - retried at the next tick
            logger.warning("could not store answers kept while the database was away: %s", error)
        if not self._sweeping.is_set():
            return RecoveryResult()
        try:
            return self.sweep(now)
        except Exception as error:
            logger.warning("recovery sweep failed (retrying in %.0f s): %s", self._interval_s, error)
            return RecoveryResult()

    def sweep(self, now: datetime | None = None) -> RecoveryResult:
        now = now or utcnow()
        result = RecoveryResult()
        mine_in_progress = self._answers.active_questions()
        for question in self._leases.abandoned(
            now=now, legacy_before=now - self._legacy_min_age, owner_is_gone=self._is_gone
        ):
            if question.owner == self._leases.owner and question.id in mine_in_progress:
                continue
            gone = question.owner not in (None, self._leases.owner) and self._is_gone(question.owner)
            if not self._leases.take_over(question, owner_gone=gone, now=now):
                continue
            self._finish(question, now, gone, result)
        if result.reanswered or result.apologised:
            logger.info(
                "recovery: %d question(s) re-answered, %d apologised for", len(result.reanswered), len(result.apologised)
            )
        return result

    def _finish(self, question: UnfinishedQuestion, now: datetime, gone: bool, result: RecoveryResult) -> None:
        why = (
            "its instance is gone" if gone
            else "it had no owner" if question.owner is None
            else "its lease ran out" if question.owner != self._leases.owner
            else "this instance's own lease ran out"
        )
        age = now - question.created_at
        attempts = question.attempts + 1
        notice: str | None = None
        if age > self._max_age:
            notice, reason = messages_ko.ANSWER_INTERRUPTED, f"interrupted {age} ago"
        elif attempts > self._max_attempts:
            notice, reason = messages_ko.ANSWER_GAVE_UP, f"taken over {attempts} times"
        if notice is not None:
            logger.warning("question %d in %s: taken over (%s) but %s; telling the user",
                           question.id, question.thread_ref, why, reason)
            try:
                _apologise(self._client, question, notice)
            except Exception as error:
                logger.error("could not apologise for question %d in %s (retrying later): %s",
                             question.id, question.thread_ref, error)
                self._leases.release([question.id])
                return
            self._store.set_status(question.id, "failed", f"recovery: {reason}")
            metrics.question_apologised()
            result.apologised.append(question.id)
            return
        logger.info("question %d in %s: taken over (%s), answering it again (attempt %d)",
                    question.id, question.thread_ref, why, attempts)
        try:
            self._answers.answer_stored(self._client, question.id)
        except Exception as error:
            logger.error("could not resubmit question %d in %s (retrying later): %s",
                         question.id, question.thread_ref, error)
            self._leases.release([question.id])
            return
        metrics.question_recovered()
        result.reanswered.append(question.id)

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        """Run `tick` every `interval_s` on a background thread (the caller runs the first one)."""
        self._thread = threading.Thread(target=self._run, name="finbot-recovery", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.tick()

    def stop_sweeping(self) -> None:
        """Keep renewing our leases, take nothing over (a shutdown has begun)."""
        self._sweeping.clear()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def shut_down(answers: AnswerService, recovery: RecoveryLoop | None, deadline_s: float) -> None:
    """Graceful shutdown: nothing taken over any more, nothing left owned, no stream left open.

    Past the deadline (plus the interruption's own grace) the process exits at once: a worker
    blocked inside the engine would otherwise hold the interpreter open. Its question has been
    released by then, so the next instance answers it.
    """
    if recovery is not None:
        recovery.stop_sweeping()
    all_stopped = answers.stop_gracefully(deadline_s)
    if recovery is not None:
        recovery.stop()
    try:
        if answers.store_unsaved_answers():
            logger.error("some answers shown in Slack could not be stored; their questions may be answered again")
    except Exception as error:  # noqa: BLE001 - the database is still away
        logger.error("could not store answers kept while the database was away: %s", error)
    if answers.leases is not None:
        try:
            released = answers.leases.release()
        except Exception as error:
            logger.error("could not release question leases; they expire on their own: %s", error)
        else:
            if released:
                logger.info("released %d unfinished question(s) for the next instance", released)
    if all_stopped:
        return
    logger.warning("an answer did not stop after the shutdown deadline; exiting, the next instance answers it")
    logging.shutdown()
    os._exit(0)
