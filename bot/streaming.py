"""Showing an answer in Slack while it is generated, within Slack's rate limits.

Two ways, chosen per workspace:

* native streaming (``chat.startStream``/``appendStream``/``stopStream`` through slack-sdk's
  ``chat_stream`` helper): the answer grows in one message, like chat assistants do;
* a posted message edited with ``chat.update``: used after a workspace refused native streaming
  once (remembered for the life of the process), and when a started stream breaks off.

Appends are batched (every `flush_seconds` or `flush_chars` characters). A ``ratelimited`` reply
postpones the next flush by its ``Retry-After`` while text keeps accumulating, so nothing is lost;
the final calls wait and retry. Slack answering HTTP 5xx or not being reachable is retried with
backoff by the bot's WebClient (bot/app.py) and, for the final calls, here too, for about
`SERVER_ERROR_BUDGET_S` in all. The streamed view shows the raw model text (escaped so nothing can
ping); the final message is the cleaned answer, which replaces the streamed view.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.error import HTTPError, URLError

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.web.chat_stream import ChatStream

from bot import metrics
from bot.formatting import escape_for_stream, split_message, to_mrkdwn

logger = logging.getLogger(__name__)

T = TypeVar("T")
Mode = Literal["native", "update"]

STREAMING_CURSOR = " \u258d"  # ▍ after the text while it is still being written (chat.update path)
# Where Markdown (the streamed view) and mrkdwn (the final answer) could render the same text
# differently: emphasis, code, quotes, headings, lists, links, escapes and line breaks.
_MARKUP_CHARS = re.compile(r"[*_~`>#|\\\[\]\n\r\u2060]|^\s*(?:[-+]|\d+[.)])\s")
MAX_RETRY_AFTER_SECONDS = 30.0
# How long a call that ends an answer keeps retrying Slack's server errors and connection failures
# (the WebClient's own retries, bot/app.py, count towards it), and the backoff between attempts.
SERVER_ERROR_BUDGET_S = 30.0
SERVER_ERROR_FIRST_DELAY_S = 0.5
SERVER_ERROR_MAX_DELAY_S = 5.0
# Connection failures that may be retried: refused, reset, or not reachable (urllib's URLError is
# an OSError). A timed-out call is not among them: Slack may have done it.
RETRYABLE_CONNECTION_ERRORS: tuple[type[OSError], ...] = (ConnectionError, URLError)


def is_rate_limited(error: SlackApiError) -> bool:
    return error.response.get("error") == "ratelimited" or error.response.status_code == 429


def is_server_error(error: SlackApiError) -> bool:
    """Slack (or a proxy in front of it) answered HTTP 5xx: worth retrying after a while."""
    return 500 <= (error.response.status_code or 0) <= 599


def is_retryable_connection_error(error: BaseException) -> bool:
    # urllib's HTTPError is a URLError too, but it carries an HTTP answer: not a connection failure.
    return isinstance(error, RETRYABLE_CONNECTION_ERRORS) and not isinstance(error, HTTPError)


def server_error_delay(failures: int) -> float:
    """Seconds to wait after the `failures`-th failure in a row: 0.5, 1, 2, 4, then 5 (plus up to 10 %
    jitter, so that many waiting calls do not all come back at the same moment)."""
    base = min(SERVER_ERROR_FIRST_DELAY_S * 2 ** max(failures - 1, 0), SERVER_ERROR_MAX_DELAY_S)
    return base * (1 + 0.1 * random.random())


def describe_slack_error(error: BaseException) -> str:
    """A short reason for the operator's log (the Slack error code, or the HTTP status); never a token."""
    if isinstance(error, SlackApiError):
        code = error.response.get("error") if isinstance(error.response.data, dict) else None
        status = error.response.status_code
        return f"HTTP {status} {code}" if status and status != 200 else str(code)
    return f"{type(error).__name__}: {error}"


def retry_after_seconds(error: SlackApiError, default: float = 1.0) -> float:
    headers = error.response.headers or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_SECONDS) if value is not None else default
    except (TypeError, ValueError):
        return default


def call_with_backoff(
    call: Callable[[], T],
    what: str,
    thread_ref: str,
    attempts: int = 5,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    server_error_budget_s: float = SERVER_ERROR_BUDGET_S,
) -> T:
    """Run a Slack call, waiting out ``ratelimited`` replies (Retry-After) up to `attempts` times,
    and HTTP 5xx answers and connection failures with backoff until `server_error_budget_s` after
    the first attempt.

    The bot's WebClient already retries 5xx and connection failures for about as long (bot/app.py);
    its retries count towards the budget, so a call is not retried for twice the time. A client
    without those retries (e.g. in tests) gets them here. Retrying a call whose first attempt Slack
    did carry out despite the error would repeat it (a second message for chat.postMessage); a 5xx
    almost always means it was not carried out, and an answer lost is worse than a rare duplicate.
    """
    started = clock()
    rate_limited = 0
    failures = 0
    while True:
        try:
            return call()
        except SlackApiError as error:
            if is_rate_limited(error):
                rate_limited += 1
                if rate_limited >= attempts:
                    raise
                delay = retry_after_seconds(error)
                metrics.slack_retry(what, "ratelimited")
                logger.warning(
                    "%s in %s rate-limited; retrying in %.1fs (attempt %d)", what, thread_ref, delay, rate_limited
                )
            elif is_server_error(error):
                failures += 1
                delay = server_error_delay(failures)
                if clock() - started + delay > server_error_budget_s:
                    raise
                metrics.slack_retry(what, f"http_{error.response.status_code}")
                logger.warning(
                    "%s in %s failed (%s); retrying in %.1fs (attempt %d)",
                    what, thread_ref, describe_slack_error(error), delay, failures,
                )
            else:
                raise
        except OSError as error:
            if not is_retryable_connection_error(error):
                raise
            failures += 1
            delay = server_error_delay(failures)
            if clock() - started + delay > server_error_budget_s:
                raise
            metrics.slack_retry(what, "connection_error")
            logger.warning(
                "%s in %s failed (%s); retrying in %.1fs (attempt %d)",
                what, thread_ref, describe_slack_error(error), delay, failures,
            )
        sleep(delay)


class StreamingModes:
    """Remembers the workspaces that refused native streaming."""

    def __init__(self, native_enabled: bool = True) -> None:
        self._native_enabled = native_enabled
        self._refused: set[str] = set()
        self._lock = threading.Lock()

    def mode_for(self, team_id: str) -> Mode:
        with self._lock:
            return "native" if self._native_enabled and team_id not in self._refused else "update"

    def refuse(self, team_id: str) -> None:
        with self._lock:
            self._refused.add(team_id)


@dataclass(frozen=True)
class ReplyTarget:
    team_id: str
    channel_id: str
    thread_ts: str
    user_id: str | None

    @property
    def thread_ref(self) -> str:
        """How operators find the thread in logs."""
        return f"{self.team_id}/{self.channel_id}/{self.thread_ts}"


@dataclass(frozen=True)
class StreamSettings:
    flush_seconds: float = 0.7
    flush_chars: int = 300
    message_limit: int = 3000


class AnswerStreamer:
    """One answer's Slack message(s): shows growing text, then the final answer.

    `placeholder_ts` is an existing bot message to reuse (the "thinking" placeholder);
    `on_reply_ts` is told the ts of the message that holds the answer whenever it changes.
    """

    def __init__(
        self,
        client: WebClient,
        target: ReplyTarget,
        modes: StreamingModes,
        settings: StreamSettings,
        placeholder_ts: str | None = None,
        on_reply_ts: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._target = target
        self._modes = modes
        self._settings = settings
        self._mode: Mode = modes.mode_for(target.team_id)
        self._placeholder_ts = placeholder_ts
        self._on_reply_ts = on_reply_ts
        self._clock = clock
        self._sleep = sleep
        self._stream: ChatStream | None = None
        self._stream_ts: str | None = None
        self._handed = 0  # characters of the escaped view handed to the native stream
        self._raw = ""
        self._shown_raw_len = 0
        self._last_flush: float | None = None
        self._not_before = 0.0
        # When answer text first showed in Slack (`clock` time), for the time-to-first-text metric.
        self.first_text_at: float | None = None

    @property
    def mode(self) -> Mode:
        return self._mode

    def adopt_placeholder(self, ts: str) -> None:
        """Reuse the placeholder message `ts`, posted after this streamer was made (before any text)."""
        if self._placeholder_ts is None and self._stream is None:
            self._placeholder_ts = ts

    # ------------------------------------------------------------------ while generating

    def feed(self, raw_so_far: str) -> None:
        """The model's raw text so far; flushes to Slack when a batch is due."""
        self._raw = raw_so_far
        now = self._clock()
        if now < self._not_before:
            return
        pending = len(raw_so_far) - self._shown_raw_len
        if pending <= 0:
            return
        due = (
            self._last_flush is None
            or now - self._last_flush >= self._settings.flush_seconds
            or pending >= self._settings.flush_chars
        )
        if due:
            self._flush(now)

    def _flush(self, now: float) -> None:
        self._last_flush = now
        try:
            if self._mode == "native":
                self._flush_native()
            else:
                self._flush_update()
            self._shown_raw_len = len(self._raw)
        except SlackApiError as error:
            if is_rate_limited(error):
                delay = retry_after_seconds(error)
                self._not_before = now + delay
                logger.warning(
                    "streaming in %s rate-limited; next update in %.1fs", self._target.thread_ref, delay
                )
                return
            if is_server_error(error):
                # Slack is having trouble (the WebClient has retried already); not a refusal of
                # streaming. Text keeps accumulating and the next batch carries it.
                self._postpone(now, error)
                return
            self._on_stream_error(error)
        except OSError as error:
            if not is_retryable_connection_error(error):
                raise
            self._postpone(now, error)

    def _postpone(self, now: float, error: BaseException) -> None:
        delay = SERVER_ERROR_MAX_DELAY_S
        self._not_before = now + delay
        logger.warning(
            "streaming in %s failed (%s); next update in %.1fs", self._target.thread_ref,
            describe_slack_error(error), delay,
        )

    def _flush_native(self) -> None:
        view = escape_for_stream(self._raw)
        # Trailing whitespace waits for the text after it: it shows nothing, and the final answer
        # (stripped) can then still be what the stream already holds (see `finish`).
        delta = view[self._handed : len(view.rstrip())]
        if not delta:
            return
        if self._stream is None:
            kwargs: dict[str, Any] = {}
            if not self._target.channel_id.startswith("D") and self._target.user_id:
                # Slack requires the recipient when streaming into a channel.
                kwargs = {"recipient_team_id": self._target.team_id, "recipient_user_id": self._target.user_id}
            # buffer_size=1: the batching happens here, so every append is sent at once.
            self._stream = self._client.chat_stream(
                channel=self._target.channel_id, thread_ts=self._target.thread_ts, buffer_size=1, **kwargs
            )
        self._handed += len(delta)
        # A failed call leaves the text in the helper's buffer; the next append sends it along.
        self._stream.append(markdown_text=delta)
        if self.first_text_at is None:
            self.first_text_at = self._clock()
        if self._stream_ts is None and self._stream.ts is not None:
            self._stream_ts = self._stream.ts
            self._started_native()

    def _started_native(self) -> None:
        assert self._stream_ts is not None
        if self._on_reply_ts is not None:
            self._on_reply_ts(self._stream_ts)
        if self._placeholder_ts is not None:
            try:
                self._client.chat_delete(channel=self._target.channel_id, ts=self._placeholder_ts)
            except SlackApiError as error:
                logger.warning(
                    "could not delete placeholder in %s: %s", self._target.thread_ref, error.response.get("error")
                )
            self._placeholder_ts = None

    def _on_stream_error(self, error: SlackApiError) -> None:
        code = error.response.get("error")
        if self._mode == "native" and self._stream_ts is None:
            logger.warning(
                "workspace %s refused native streaming (%s); using chat.update there from now on (%s)",
                self._target.team_id, code, self._target.thread_ref,
            )
            self._modes.refuse(self._target.team_id)
            self._switch_to_update(None)
        elif self._mode == "native":
            logger.warning("stream in %s broke off (%s); finishing with chat.update", self._target.thread_ref, code)
            self._switch_to_update(self._stream_ts)
        else:
            logger.warning("could not show progress in %s: %s", self._target.thread_ref, code)
            return
        try:
            self._flush_update()
            self._shown_raw_len = len(self._raw)
        except SlackApiError as second:
            logger.warning("could not show progress in %s: %s", self._target.thread_ref, second.response.get("error"))

    def _switch_to_update(self, message_ts: str | None) -> None:
        self._mode = "update"
        self._stream = None
        if message_ts is not None:
            self._placeholder_ts = message_ts

    def _flush_update(self) -> None:
        pieces = split_message(to_mrkdwn(self._raw), self._settings.message_limit - len(STREAMING_CURSOR))
        if not pieces:
            return
        self._show(pieces[0] + STREAMING_CURSOR)
        if self.first_text_at is None:
            self.first_text_at = self._clock()

    def _show(self, text: str, blocks: Sequence[dict[str, Any]] | None = None, wait: bool = False) -> str | None:
        """Put `text` in the reply message (editing it, or posting it when there is none)."""

        def update() -> Any:
            return self._client.chat_update(
                channel=self._target.channel_id, ts=self._placeholder_ts, text=text, blocks=blocks or []
            )

        def post() -> Any:
            return self._client.chat_postMessage(
                channel=self._target.channel_id, thread_ts=self._target.thread_ts, text=text,
                blocks=blocks or None, unfurl_links=False,
            )

        if self._placeholder_ts is not None:
            try:
                if wait:
                    call_with_backoff(
                        update, "chat.update", self._target.thread_ref, sleep=self._sleep, clock=self._clock
                    )
                else:
                    update()
                return self._placeholder_ts
            except SlackApiError as error:
                if is_rate_limited(error) and not wait:
                    raise
                if error.response.get("error") not in ("message_not_found", "cant_update_message", "edit_window_closed"):
                    raise
                logger.warning("reply message in %s is gone (%s); posting anew", self._target.thread_ref,
                               error.response.get("error"))
        if wait:
            response = call_with_backoff(
                post, "chat.postMessage", self._target.thread_ref, sleep=self._sleep, clock=self._clock
            )
        else:
            response = post()
        self._placeholder_ts = response.get("ts")
        if self._placeholder_ts is not None and self._on_reply_ts is not None:
            self._on_reply_ts(self._placeholder_ts)
        return self._placeholder_ts

    # ------------------------------------------------------------------ the end

    def _stop_native(self, final_text: str | None = None, blocks: Sequence[dict[str, Any]] | None = None) -> None:
        """Send the tail still buffered or unsent and close the stream, waiting out rate limits.

        With `final_text` (which the streamed view must be a prefix of), the stream ends with exactly
        that text and `blocks` below it: the final answer without a chat.update.
        """
        assert self._stream is not None
        if final_text is None:
            view = escape_for_stream(self._raw)
            tail = view[self._handed :]
            self._handed = len(view)
        else:
            tail = final_text[self._handed :]
            self._handed = len(final_text)
        stream = self._stream
        first = [True]

        def stop() -> Any:
            # The helper keeps text it could not send in its buffer, so a retry sends it again.
            text = tail if first[0] else None
            first[0] = False
            return stream.stop(markdown_text=text, blocks=list(blocks) if blocks else None)

        call_with_backoff(stop, "chat.stopStream", self._target.thread_ref, sleep=self._sleep, clock=self._clock)

    def _foldable(self, pieces: Sequence[str]) -> str | None:
        """The final text, if the stream can simply end with it (see `finish`); else None."""
        if len(pieces) != 1:
            return None
        final = pieces[0]
        if _MARKUP_CHARS.search(final):
            return None
        # Everything handed to the stream so far must already be exactly the start of the answer.
        view = escape_for_stream(self._raw)
        if self._handed > len(final) or view[: self._handed] != final[: self._handed]:
            return None
        return final

    def finish(self, pieces: Sequence[str], last_blocks: Sequence[dict[str, Any]] | None = None) -> str | None:
        """Replace the view with the final answer `pieces` (one Slack message each).

        The last piece carries `last_blocks` (below a section holding its text). Returns the ts of
        the first message of the answer (the one that was streamed into), or None if Slack
        could not be reached.
        """
        if self._mode == "native" and self._stream is not None and self._stream_ts is not None:
            final = self._foldable(pieces)
            try:
                if final is not None:
                    # The streamed text already is the final answer: the stream ends with it and
                    # the buttons, and no chat.update has to replace it.
                    self._stop_native(final, last_blocks)
                    self._stream = None
                    return self._stream_ts
                self._stop_native()
            except (SlackApiError, OSError) as error:
                logger.warning("could not stop stream in %s: %s", self._target.thread_ref, describe_slack_error(error))
            self._switch_to_update(self._stream_ts)
        first_ts: str | None = None
        for index, piece in enumerate(pieces):
            blocks: list[dict[str, Any]] | None = None
            if index == len(pieces) - 1 and last_blocks:
                blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": piece}}, *last_blocks]
            try:
                ts = self._show(piece, blocks, wait=True)
            except (SlackApiError, OSError) as error:
                # Retried with backoff for SERVER_ERROR_BUDGET_S already (see call_with_backoff).
                logger.error("could not post the answer in %s: %s", self._target.thread_ref, describe_slack_error(error))
                return first_ts
            if index == 0:
                first_ts = ts
            # Later pieces are new messages in the thread; the reply ts stays the first one.
            self._placeholder_ts = None
            self._on_reply_ts = None
        return first_ts

    def fail(self, text: str) -> str | None:
        """Show an apology (or any final notice) instead of an answer."""
        return self.finish([text])
