"""Answering a question in its Slack thread: store it, show progress, stream the answer, store it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from sqlalchemy.exc import SQLAlchemyError

from bot import messages_ko, metrics
from bot.formatting import split_message, to_mrkdwn
from bot.rate_limits import QuestionRateLimiter
from bot.streaming import AnswerStreamer, ReplyTarget, StreamingModes, StreamSettings
from llm.answering import answer_question, clean_reply, stream_raw_answer
from llm.engine import GenerationEngine, SamplingParams
from llm.errors import EngineBusyError, PromptTooLongError
from storage.answer_timings import AnswerTimingStore
from storage.conversations import ConversationStore, LeaseLostError
from storage.leases import QuestionLeases
from storage.questions import QuestionStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

FEEDBACK_UP_ACTION = "finbot_feedback_up"
FEEDBACK_DOWN_ACTION = "finbot_feedback_down"


@dataclass(frozen=True)
class IncomingQuestion:
    team_id: str
    channel_id: str
    thread_ts: str
    message_ts: str
    user_id: str | None
    text: str

    @property
    def target(self) -> ReplyTarget:
        """Where the reply goes: the question's thread."""
        return ReplyTarget(self.team_id, self.channel_id, self.thread_ts, self.user_id)


# The "thinking" placeholder is posted only if no answer text has appeared this long after the
# question was stored: an answer that starts at once needs no placeholder (and no deletion of it).
PLACEHOLDER_DELAY_S = 0.5


@dataclass(frozen=True)
class _Job:
    target: ReplyTarget
    conversation_id: int
    message_id: int
    text: str
    placeholder_ts: str | None
    # The placeholder that is posted if the answer has not started in time (armed when stored,
    # so a question waiting for a free worker still gets one).
    deferred_placeholder: _DeferredPlaceholder | None = None
    # When the question's event arrived (time.monotonic), for the latency metrics; None for a
    # question stored earlier (taken over, or resumed after a restart).
    received_at: float | None = None


class _DeferredPlaceholder:
    """Posts the placeholder from a timer unless the answer starts first; `settle` decides the race."""

    def __init__(self, post: Callable[[], str | None], delay: float) -> None:
        self._post = post
        self._lock = threading.Lock()
        self._settled = False
        self._ts: str | None = None
        self._timer = threading.Timer(delay, self._fire)
        self._timer.daemon = True
        self._timer.name = "finbot-placeholder"
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self._settled:
                self._settled = True
                self._ts = self._post()

    def settle(self) -> str | None:
        """No placeholder from now on; returns the ts of one already posted (waits for a post in flight)."""
        self._timer.cancel()
        with self._lock:
            self._settled = True
            return self._ts


def feedback_blocks(question_id: int) -> list[dict[str, Any]]:
    """👍/👎 buttons under an answer; the value is the question's id (its answer is looked up)."""
    return [
        {
            "type": "actions",
            "block_id": "finbot_feedback",
            "elements": [
                {
                    "type": "button",
                    "action_id": FEEDBACK_UP_ACTION,
                    "text": {"type": "plain_text", "text": "👍", "emoji": True},
                    "value": str(question_id),
                },
                {
                    "type": "button",
                    "action_id": FEEDBACK_DOWN_ACTION,
                    "text": {"type": "plain_text", "text": "👎", "emoji": True},
                    "value": str(question_id),
                },
            ],
        }
    ]


class AnswerService:
    """Owns the generation workers so Bolt's listener threads return at once."""

    def __init__(
        self,
        store: ConversationStore,
        engine: GenerationEngine,
        params: SamplingParams,
        max_prompt_tokens: int,
        workers: int = 4,
        *,
        questions: QuestionStore | None = None,
        stream_settings: StreamSettings | None = None,
        streaming_modes: StreamingModes | None = None,
        rate_limiter: QuestionRateLimiter | None = None,
        timeout_s: float = 120,
        leases: QuestionLeases | None = None,
        timings: AnswerTimingStore | None = None,
    ) -> None:
        self._store = store
        # Time to first text per answered question, for the admins' median in the Home tab.
        self._timings = timings
        # When the engine last produced answer text and last failed (time.monotonic): /readyz needs
        # no probe while answers flow, and always probes after a failure.
        self._last_engine_output = float("-inf")
        self._last_engine_failure = float("-inf")
        # With leases, every question this service stores or takes over is owned by this instance
        # (see storage.leases); without (tests, one-off tools) questions have no owner.
        self._leases = leases
        self._owner = leases.owner if leases is not None else None
        # Questions being answered right now, with the event that stops their generation.
        self._active: dict[int, threading.Event] = {}
        # Questions waiting for a worker, with their placeholder timers.
        self._queued: dict[int, _Job] = {}
        self._jobs_lock = threading.Lock()
        # Set when a shutdown interrupts answers: they hand their questions on instead of failing.
        self._stopping = threading.Event()
        # Answers shown but not stored (database unreachable): (conversation, answer, question).
        self._unsaved: list[tuple[int, str, int]] = []
        self._timeout_s = timeout_s
        self._engine = engine
        self._params = params
        self._max_prompt_tokens = max_prompt_tokens
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="finbot-answer")
        # The conversation store's sessions serve the question lookups too.
        self._questions = questions or QuestionStore(store.session_factory)
        self._stream_settings = stream_settings or StreamSettings()
        self._modes = streaming_modes or StreamingModes()
        self._rate_limiter = rate_limiter

    @property
    def questions(self) -> QuestionStore:
        return self._questions

    @property
    def leases(self) -> QuestionLeases | None:
        return self._leases

    def active_questions(self) -> set[int]:
        """Questions this process is generating an answer for, or has queued."""
        with self._jobs_lock:
            return set(self._active) | set(self._queued)

    def pipeline_counts(self) -> dict[str, int]:
        """Questions waiting for a worker and being answered (the metrics' in-progress gauge)."""
        with self._jobs_lock:
            answering = len(self._active)
            waiting = len(set(self._queued) - set(self._active))
        return {"waiting": waiting, "answering": answering}

    def seconds_since_engine_output(self) -> float:
        """Since the engine last produced answer text; infinite when it failed since."""
        if self._last_engine_failure >= self._last_engine_output:
            return float("inf")
        return time.monotonic() - self._last_engine_output

    def submit(
        self,
        client: WebClient,
        question: IncomingQuestion,
        *,
        placeholder: bool = True,
        event_id: str | None = None,
        on_stored: Callable[[], None] | None = None,
    ) -> Future[None] | None:
        """Store the question, acknowledge it in the thread and generate in the background.

        `placeholder=False` skips the "thinking" message (the assistant pane shows a status instead);
        otherwise it is posted only when no answer text appears within `PLACEHOLDER_DELAY_S`.
        `event_id` (the Slack event's) is claimed in the transaction that stores the question, so a
        question that failed to store is still answered when Slack retries the event, and a
        redelivery of a stored one is ignored. `on_stored` runs once the question is stored, before
        it is queued (never for a redelivery or a refused question). Returns None when nothing is
        to be done (event already handled, empty question, rate limit, or a Slack message already
        stored).
        """
        received_at = time.monotonic()
        target = question.target
        refusal = self._refusal(question)
        if refusal is not None:
            # Nothing is stored for a refused question, so its claim is a transaction of its own;
            # it keeps a redelivered event from getting the same reply twice.
            if event_id is not None and not self._store.claim_event(event_id):
                logger.info("event %s already handled; ignoring redelivery", event_id)
                return None
            metrics.question_refused("empty" if refusal == messages_ko.EMPTY_QUESTION else "rate_limit")
            self._post_to(client, target, refusal)
            return None
        stored = self._store.store_question(
            question.team_id, question.channel_id, question.thread_ts,
            question.text, question.user_id, question.message_ts, event_id=event_id,
            owner=self._owner, lease_until=self._leases.lease_until() if self._leases is not None else None,
        )
        if stored is None:
            logger.info(
                "event %s / message %s in %s already handled; not answering twice",
                event_id, question.message_ts, target.thread_ref,
            )
            return None
        if self._rate_limiter is not None:
            self._rate_limiter.hit(question.team_id, question.channel_id, question.user_id)
        conversation_id, message_id = stored
        if on_stored is not None:
            try:
                on_stored()
            except Exception:
                # The question is stored; it must still be answered.
                logger.exception("on_stored hook failed for question %d in %s", message_id, target.thread_ref)
        deferred: _DeferredPlaceholder | None = None
        if placeholder:

            def post_placeholder() -> str | None:
                ts = self._post_to(client, target, messages_ko.THINKING)
                if ts is not None:
                    self._questions.set_reply_ts(message_id, ts)
                return ts

            deferred = _DeferredPlaceholder(post_placeholder, PLACEHOLDER_DELAY_S)
        job = _Job(
            target=target,
            conversation_id=conversation_id,
            message_id=message_id,
            text=question.text,
            placeholder_ts=None,
            deferred_placeholder=deferred,
            received_at=received_at,
        )
        return self._enqueue(client, job)

    def _refusal(self, question: IncomingQuestion) -> str | None:
        """The reply to a question that is not to be answered (empty, over a rate limit), else None."""
        if not question.text.strip():
            return messages_ko.EMPTY_QUESTION
        if self._rate_limiter is None:
            return None
        exceeded = self._rate_limiter.exceeded(question.team_id, question.channel_id, question.user_id)
        if exceeded is None:
            return None
        logger.info("%s rate limit reached by %s in %s", exceeded, question.user_id, question.target.thread_ref)
        return messages_ko.RATE_LIMITED_USER if exceeded == "user" else messages_ko.RATE_LIMITED_CHANNEL

    def answer_stored(self, client: WebClient, message_id: int) -> Future[None] | None:
        """Answer the already-stored question `message_id` (e.g. one interrupted by a restart).

        Reuses its stored reply message (``reply_ts``, the placeholder or a half-streamed answer)
        when there is one, else posts a placeholder and stores its ts. Returns None when there is
        no such question or it is already answered.
        """
        stored = self._questions.get(message_id)
        if stored is None:
            logger.warning("no stored question with id %d; nothing to answer", message_id)
            return None
        if stored.status == "answered":
            logger.info("question %d is already answered", message_id)
            return None
        target = ReplyTarget(stored.team_id, stored.channel_id, stored.thread_ts, stored.slack_user)
        placeholder_ts = stored.reply_ts
        if placeholder_ts is None:
            placeholder_ts = self._post_to(client, target, messages_ko.THINKING)
            if placeholder_ts is not None:
                self._questions.set_reply_ts(message_id, placeholder_ts)
        job = _Job(target, stored.conversation_id, stored.id, stored.text, placeholder_ts)
        return self._enqueue(client, job)

    def _enqueue(self, client: WebClient, job: _Job) -> Future[None] | None:
        with self._jobs_lock:
            self._queued[job.message_id] = job
        try:
            return self._executor.submit(self._answer, client, job)
        except RuntimeError:
            # Shutting down: the question stays stored and unfinished, for the next owner.
            with self._jobs_lock:
                self._queued.pop(job.message_id, None)
            self._hand_back([job])
            return None

    def _hand_back(self, jobs: list[_Job]) -> None:
        """Questions this instance will not answer: no placeholder from now on, leases released at
        once so the next start or another instance takes them without waiting for the lease."""
        for job in jobs:
            if job.deferred_placeholder is not None:
                job.deferred_placeholder.settle()
        if jobs and self._leases is not None:
            self._leases.release([job.message_id for job in jobs])
            logger.info("%d queued question(s) released for the next instance", len(jobs))

    def run_in_background(self, function: Callable[..., T], *args: Any) -> Future[T]:
        """Run `function` on the generation workers (for work that calls the engine)."""
        return self._executor.submit(function, *args)

    def generate(self, prompt_question: str) -> str:
        """A cleaned answer to `prompt_question` without history and without Slack (blocking)."""
        return answer_question(self._engine, [], prompt_question, self._params, self._max_prompt_tokens)

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=not wait)

    def stop_gracefully(self, deadline_s: float, interrupt_wait_s: float = 10.0) -> bool:
        """Shut down without losing a question; True when no worker is left running.

        Questions still waiting for a worker are given up at once (their leases released, so the
        next start or another instance answers them immediately). Answers in progress get
        `deadline_s` to finish; then they are interrupted: each closes its Slack message with a
        "continuing shortly" notice (no stream left open) and releases its question.
        """
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._jobs_lock:
            # The executor dropped the queued jobs; those it had started already are in _active.
            waiting = [job for message_id, job in self._queued.items() if message_id not in self._active]
            for job in waiting:
                self._queued.pop(job.message_id, None)
        self._hand_back(waiting)
        if self._wait_idle(deadline_s):
            return True
        with self._jobs_lock:
            interrupted = list(self._active.items())
        logger.warning(
            "shutdown: %d answer(s) still running after %.0f s; interrupting them, they continue after the restart",
            len(interrupted), deadline_s,
        )
        self._stopping.set()
        for _message_id, cancel in interrupted:
            cancel.set()
        return self._wait_idle(interrupt_wait_s)

    def _wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            with self._jobs_lock:
                if not self._active and not self._queued:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _answer(self, client: WebClient, job: _Job) -> None:
        cancel = threading.Event()
        with self._jobs_lock:
            self._queued.pop(job.message_id, None)
            self._active[job.message_id] = cancel
        try:
            self._answer_owned(client, job, cancel)
        except Exception as error:
            # Not the user's fault and not the engine's (those are handled inside): hand the
            # question on, so a sweep answers it again (or apologises after RECOVERY_MAX_ATTEMPTS).
            logger.error("answering question %d in %s failed: %r; leaving it for recovery",
                         job.message_id, job.target.thread_ref, error)
            if self._leases is not None:
                try:
                    self._leases.release([job.message_id])
                except Exception as release_error:  # noqa: BLE001 - its lease then simply runs out
                    logger.warning("could not release question %d: %r", job.message_id, release_error)
        finally:
            with self._jobs_lock:
                self._active.pop(job.message_id, None)

    def store_unsaved_answers(self) -> int:
        """Store answers the database could not take when they were shown; returns how many are left."""
        with self._jobs_lock:
            pending, self._unsaved = self._unsaved, []
        left = []
        for conversation_id, answer, message_id in pending:
            try:
                self._store.add_assistant_message(
                    conversation_id, answer, reply_to_id=message_id, slack_ts=None, owner=self._owner
                )
                logger.info("stored the answer to question %d after the database came back", message_id)
            except LeaseLostError:
                logger.warning("question %d was taken over before its answer could be stored", message_id)
            except SQLAlchemyError:
                left.append((conversation_id, answer, message_id))
        with self._jobs_lock:
            self._unsaved.extend(left)
            return len(self._unsaved)

    def _answer_owned(self, client: WebClient, job: _Job, cancel: threading.Event) -> None:
        target = job.target
        deferred = job.deferred_placeholder
        try:
            history = self._store.start_answer(job.message_id, job.conversation_id, owner=self._owner)
        except LeaseLostError:
            if deferred is not None:
                deferred.settle()
            logger.info("question %d in %s was taken over by another instance; not answering it here",
                        job.message_id, target.thread_ref)
            return
        except BaseException:
            if deferred is not None:
                deferred.settle()
            raise
        streamer = AnswerStreamer(
            client,
            target,
            self._modes,
            self._stream_settings,
            placeholder_ts=job.placeholder_ts,
            on_reply_ts=lambda ts: self._questions.set_reply_ts(job.message_id, ts),
        )

        def settle_placeholder() -> None:
            nonlocal deferred
            if deferred is not None:
                placeholder_ts = deferred.settle()
                deferred = None
                if placeholder_ts is not None:
                    streamer.adopt_placeholder(placeholder_ts)

        raw = ""
        first_chunk_at: float | None = None
        # The engine checks `cancel` between tokens, so a stuck or runaway answer frees its slot.
        deadline = threading.Timer(self._timeout_s, cancel.set)
        deadline.daemon = True
        deadline.start()
        try:
            generation = stream_raw_answer(
                self._engine, history, job.text, self._params, self._max_prompt_tokens, cancel
            )
            for chunk in generation:
                raw += chunk
                self._last_engine_output = time.monotonic()
                if first_chunk_at is None:
                    first_chunk_at = self._last_engine_output
                settle_placeholder()
                streamer.feed(raw)
            if cancel.is_set() and self._stopping.is_set():
                self._hand_on(job, streamer, settle_placeholder)
                return
            if cancel.is_set():
                raise TimeoutError(f"no complete answer within {self._timeout_s:g} s")
        except TimeoutError as error:
            logger.error("generation timed out for question %d in %s: %s", job.message_id, target.thread_ref, error)
            self._last_engine_failure = time.monotonic()
            metrics.question_failed("timeout")
            self._fail(job, streamer, settle_placeholder, str(error), messages_ko.GENERATION_TIMED_OUT)
            return
        except PromptTooLongError as error:
            logger.warning("question in %s is too long: %s", target.thread_ref, error)
            metrics.question_refused("too_long")
            self._fail(job, streamer, settle_placeholder, str(error), messages_ko.QUESTION_TOO_LONG)
            return
        except EngineBusyError as error:
            logger.warning("engine busy, question in %s deferred to the user: %s", target.thread_ref, error)
            metrics.question_refused("busy")
            self._fail(job, streamer, settle_placeholder, "engine busy", messages_ko.ENGINE_BUSY)
            return
        except Exception as error:
            # One line for the operator (out of memory, a device error...); the stack only at DEBUG.
            logger.error("generation failed for question %d in %s: %r", job.message_id, target.thread_ref, error,
                         exc_info=logger.isEnabledFor(logging.DEBUG))
            self._last_engine_failure = time.monotonic()
            metrics.question_failed("engine_error")
            self._fail(job, streamer, settle_placeholder, repr(error), messages_ko.GENERATION_FAILED)
            return
        finally:
            deadline.cancel()
        generation_ended_at = time.monotonic()

        settle_placeholder()
        answer = clean_reply(raw, job.text, generation.finish_reason) or messages_ko.EMPTY_ANSWER
        pieces = split_message(to_mrkdwn(answer), self._stream_settings.message_limit)
        # Saved before the final message shows the 👍/👎 buttons, which look the answer up: a quick
        # click must find it. The bot's message ts is already on the question (`reply_ts`).
        try:
            self._store.add_assistant_message(
                job.conversation_id, answer, reply_to_id=job.message_id, slack_ts=None, owner=self._owner
            )
        except LeaseLostError:
            # Our lease ran out (the database was out of reach for longer than it) and another
            # instance is answering in this message now: leave it to that one.
            logger.warning("question %d in %s was taken over while this instance answered it; dropping this answer",
                           job.message_id, target.thread_ref)
            return
        except SQLAlchemyError as error:
            # The user still gets the answer; it is stored when the database is back (the recovery
            # loop retries), and it gets no 👍/👎 until then (they look the stored answer up).
            logger.error("could not store the answer to question %d in %s (%s); showing it and retrying the store",
                         job.message_id, target.thread_ref, type(error).__name__)
            with self._jobs_lock:
                self._unsaved.append((job.conversation_id, answer, job.message_id))
            streamer.finish(pieces)
            return
        streamer.finish(pieces, feedback_blocks(job.message_id))
        logger.info(
            "answered question %d in %s (%d chars, %d message(s), %s)",
            job.message_id, target.thread_ref, len(answer), len(pieces), streamer.mode,
        )
        self._record_answered(job, raw, streamer, first_chunk_at, generation_ended_at)

    def _record_answered(
        self,
        job: _Job,
        raw: str,
        streamer: AnswerStreamer,
        first_chunk_at: float | None,
        generation_ended_at: float,
    ) -> None:
        """Metrics and the stored time to first text of an answered question; never fails the answer."""
        finished_at = time.monotonic()
        # No text streamed before the end (a short answer, or Slack refusing updates): the final
        # message was the first text the user saw.
        first_text_at = streamer.first_text_at if streamer.first_text_at is not None else finished_at
        received = job.received_at
        try:
            tokens = len(self._engine.tokenizer.encode(raw, add_special_tokens=False)) if raw else 0
        except Exception:  # a tokenizer that cannot count must not cost the user the answer
            tokens = 0
        metrics.question_answered(
            first_text_s=first_text_at - received if received is not None else None,
            answer_s=finished_at - received if received is not None else None,
            tokens=tokens,
            generation_s=generation_ended_at - first_chunk_at if first_chunk_at is not None else None,
        )
        if self._timings is None or received is None:
            return
        try:
            self._timings.record(
                job.message_id,
                first_text_ms=round((first_text_at - received) * 1000),
                answer_ms=round((finished_at - received) * 1000),
                tokens=tokens,
            )
        except Exception as error:
            logger.warning("could not store the timing of question %d: %s", job.message_id, error)

    def _hand_on(self, job: _Job, streamer: AnswerStreamer, settle_placeholder: Callable[[], None]) -> None:
        """Interrupted by a shutdown: close the message with a notice and release the question.

        The message's ts stays stored as the question's reply message, so whoever answers next
        replaces this notice (and the half answer before it) with the whole answer.
        """
        settle_placeholder()
        streamer.fail(messages_ko.ANSWER_RESUMING)
        if self._leases is not None:
            self._leases.release([job.message_id])
        logger.info("question %d in %s interrupted by the shutdown; released for the next instance",
                    job.message_id, job.target.thread_ref)

    def _fail(
        self,
        job: _Job,
        streamer: AnswerStreamer,
        settle_placeholder: Callable[[], None],
        reason: str,
        user_message: str,
    ) -> None:
        """The question stays stored, marked failed with the operator's reason; the user gets `user_message`."""
        settle_placeholder()
        self._store.set_status(job.message_id, "failed", reason)
        streamer.fail(user_message)

    @staticmethod
    def _post_to(client: WebClient, target: ReplyTarget, text: str) -> str | None:
        try:
            response = client.chat_postMessage(
                channel=target.channel_id, thread_ts=target.thread_ts, text=text, unfurl_links=False
            )
        except SlackApiError as error:
            logger.error("could not post in %s: %s", target.thread_ref, error.response.get("error"))
            return None
        return response.get("ts")
