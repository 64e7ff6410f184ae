"""finbot in a terminal: `finbot chat` (a conversation) and `finbot ask` (one question).

The answer goes through the bot's own pipeline (llm.answering: prompt within the token budget →
engine → cleaning) and a chat's thread history lives in the database exactly like a Slack
thread's (storage.conversations), so trying finbot here shows what Slack users will get, the
Korean notices included.

On a terminal the answer is shown while it is generated, as whole characters, the way Slack
shows it: the model's text so far, then the cleaned answer, which may differ at the end (e.g. an
unfinished last sentence is dropped when the token limit cut the answer), so the shown text is
then rewritten in place.
Piped into another program, only the final answer is written.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from shutil import get_terminal_size
from typing import TextIO

from bot import messages_ko
from llm.answering import clean_reply, stream_raw_answer
from llm.cleaning import strip_control_characters
from llm.engine import Generation, GenerationEngine, SamplingParams
from llm.errors import EngineBusyError, PromptTooLongError
from storage.conversations import ConversationStore

logger = logging.getLogger(__name__)

# A terminal conversation is stored like a Slack thread of this pseudo workspace and channel.
TERMINAL_TEAM = "terminal"
TERMINAL_CHANNEL = "chat"
# Its questions are owned by this name, which is not an instance id (`host:pid:start@pidns`): no
# `finbot run` on the same database ever judges the owner gone, and with a lease that never runs
# out none ever takes a terminal question over to "answer it again" in a Slack thread that does
# not exist, even when a chat was killed in the middle of an answer.
TERMINAL_OWNER = "finbot-chat"
TERMINAL_LEASE_UNTIL = datetime(9999, 1, 1, tzinfo=UTC)

QUESTION_PROMPT = "질문> "
ANSWER_PREFIX = "finbot> "

# Slack renders these emoji codes of messages_ko; a terminal shows the characters themselves.
_EMOJI = {
    ":pray:": "🙏",
    ":hourglass_flowing_sand:": "⏳",
    ":blush:": "😊",
    ":bank:": "🏦",
    ":books:": "📚",
    ":mag:": "🔍",
    ":clock9:": "🕘",
    ":palm_tree:": "🌴",
    ":speech_balloon:": "💬",
    ":raising_hand:": "🙋",
}
_EMOJI_RE = re.compile("|".join(re.escape(code) for code in _EMOJI))


def for_terminal(message: str) -> str:
    """A messages_ko sentence as a terminal shows it: emoji codes as emoji, no Slack code marks."""
    return _EMOJI_RE.sub(lambda match: _EMOJI[match.group()], message).replace("`", "")


def char_width(char: str) -> int:
    """Columns a character takes in a terminal: 2 for Hangul and other wide characters, 0 for marks."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def text_width(text: str) -> int:
    return sum(char_width(char) for char in text)


def cursor_after(text: str, columns: int, start_column: int = 0) -> tuple[int, int]:
    """(row, column) of the cursor after writing `text` from `start_column` of row 0.

    Long lines wrap at `columns`; a wide character that does not fit at the end of a row moves
    whole to the next one, as terminals do. A column equal to `columns` means the row is full and
    the terminal waits to wrap until the next character.
    """
    row, column = 0, start_column
    for char in text:
        if char == "\n":
            row, column = row + 1, 0
            continue
        width = char_width(char)
        if width and column + width > columns:
            row, column = row + 1, 0
        column += width
    return row, column


def _common_prefix(a: str, b: str) -> int:
    length = min(len(a), len(b))
    for index in range(length):
        if a[index] != b[index]:
            return index
    return length


def _displayable(text: str) -> str:
    # Control characters (escape sequences included) never reach the terminal; tabs are spaces so
    # that the cursor arithmetic stays exact.
    return strip_control_characters(text).replace("\t", "    ")


class TerminalView:
    """One answer on the terminal: shows the text so far and rewrites what changed.

    Not `interactive` (output piped to a file or program), nothing is shown until `finish`, which
    writes the final text once.
    """

    def __init__(
        self,
        out: TextIO,
        *,
        interactive: bool,
        start_column: int = 0,
        columns: Callable[[], int] | None = None,
    ) -> None:
        self._out = out
        self._interactive = interactive
        self._start_column = start_column
        self._columns = columns or (lambda: get_terminal_size().columns)
        self._shown = ""

    @property
    def interactive(self) -> bool:
        return self._interactive

    def show(self, text: str) -> None:
        """Make the terminal show `text` in place of what was shown before (interactive only)."""
        if not self._interactive:
            return
        text = _displayable(text)
        keep = _common_prefix(self._shown, text)
        if keep < len(self._shown):
            self._retract(keep)
        self._out.write(text[keep:])
        self._out.flush()
        self._shown = text

    def finish(self, text: str) -> None:
        """The final text, then a line end."""
        if self._interactive:
            self.show(text)
        else:
            self._out.write(_displayable(text))
        self._out.write("\n")
        self._out.flush()
        self._shown = ""

    def clear(self) -> None:
        """Remove what was shown (interactive only), leaving the cursor where the answer started."""
        self.show("")

    def _retract(self, keep: int) -> None:
        """Move the cursor back to character `keep` of the shown text and erase everything after it.

        Computed from the terminal's width: how the text wrapped, Hangul taking two columns. (Text
        that scrolled off the top of the screen cannot be reached; answers rewritten here change
        only near their end.)
        """
        columns = max(self._columns(), 2)
        row_now, _ = cursor_after(self._shown, columns, self._start_column)
        row, column = cursor_after(self._shown[:keep], columns, self._start_column)
        if column >= columns:  # the row was full: the next character started the next row
            row, column = row + 1, 0
        moves = "\r"
        if row_now > row:
            moves += f"\x1b[{row_now - row}A"
        if column:
            moves += f"\x1b[{column}C"
        self._out.write(moves + "\x1b[J")


@dataclass(frozen=True)
class TerminalReply:
    """How an answer ended: `answer` (cleaned, to store) or a Korean `notice` and the operator's `failure`."""

    answer: str | None
    notice: str | None = None
    failure: str | None = None
    too_long: bool = False


class TerminalAnswerer:
    """Answers one question at a time on a terminal, as the Slack bot does in a thread."""

    def __init__(
        self, engine: GenerationEngine, params: SamplingParams, max_prompt_tokens: int, timeout_s: float
    ) -> None:
        self._engine = engine
        self._params = params
        self._max_prompt_tokens = max_prompt_tokens
        self._timeout_s = timeout_s

    def answer(self, history: Sequence[tuple[str, str]], question: str, view: TerminalView) -> TerminalReply:
        """Generate, showing the text so far in `view`; the caller finishes the view with the cleaned answer.

        Ctrl-C (KeyboardInterrupt) stops the generation and reaches the caller.
        """
        cancel = threading.Event()
        # The engine checks `cancel` between tokens: a runaway answer stops after GENERATION_TIMEOUT_S.
        deadline = threading.Timer(self._timeout_s, cancel.set)
        deadline.daemon = True
        generation: Generation | None = None
        raw = ""
        try:
            generation = stream_raw_answer(
                self._engine, history, question, self._params, self._max_prompt_tokens, cancel
            )
            deadline.start()
            view.show(for_terminal(messages_ko.THINKING))
            for chunk in generation:
                raw += chunk
                # As in Slack: the raw text while it is written, the cleaned answer once it is done
                # (re-cleaning everything per chunk would cost the square of the answer's length).
                view.show(raw)
            if cancel.is_set():
                return TerminalReply(
                    None, messages_ko.GENERATION_TIMED_OUT, f"no complete answer within {self._timeout_s:g} s"
                )
        except PromptTooLongError as error:
            return TerminalReply(None, messages_ko.QUESTION_TOO_LONG, str(error), too_long=True)
        except EngineBusyError as error:
            return TerminalReply(None, messages_ko.ENGINE_BUSY, f"engine busy: {error}")
        except Exception as error:  # the engine failed for this question; the next one is answered normally
            logger.error("generation failed: %s", error, exc_info=logger.isEnabledFor(logging.DEBUG))
            return TerminalReply(None, messages_ko.GENERATION_FAILED, repr(error))
        finally:
            deadline.cancel()
            if generation is not None:
                generation.close()
        answer = clean_reply(raw, question, generation.finish_reason) or messages_ko.EMPTY_ANSWER
        return TerminalReply(answer)


def new_thread_ts() -> str:
    """A thread id shaped like Slack's ts (seconds.micros): unique per session, ordered in time."""
    return f"{time.time():.6f}"


class TerminalChat:
    """`finbot chat`: questions read line by line, each answered in the session's thread."""

    def __init__(
        self,
        store: ConversationStore,
        answerer: TerminalAnswerer,
        *,
        out: TextIO,
        interactive: bool,
        read_line: Callable[[str], str] = input,
    ) -> None:
        self._store = store
        self._answerer = answerer
        self._out = out
        self._interactive = interactive
        self._read_line = read_line
        self.thread_ts = new_thread_ts()

    def _say(self, text: str) -> None:
        self._out.write(for_terminal(text) + "\n")
        self._out.flush()

    def run(self, engine_name: str) -> int:
        """Until /quit or end of input (Ctrl-D); Ctrl-C while an answer is written stops only that answer."""
        self._say(messages_ko.CHAT_BANNER.format(engine=engine_name))
        while True:
            try:
                line = self._read_line(QUESTION_PROMPT)
            except EOFError:
                self._out.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/") and self._command(text.split()[0].lower()):
                return 0
            if not text.startswith("/"):
                self.ask(text)

    def _command(self, command: str) -> bool:
        """Runs a /command; True when the session ends."""
        if command in ("/quit", "/exit", "/q"):
            return True
        if command == "/new":
            self.thread_ts = new_thread_ts()
            self._say(messages_ko.CHAT_NEW_THREAD)
        elif command in ("/help", "/?"):
            self._say(messages_ko.CHAT_HELP)
        else:
            self._say(messages_ko.CHAT_UNKNOWN_COMMAND.format(command=command))
        return False

    def ask(self, question: str) -> TerminalReply | None:
        """Store `question` in this session's thread, answer it, store the answer; None when stopped (Ctrl-C)."""
        stored = self._store.store_question(
            TERMINAL_TEAM, TERMINAL_CHANNEL, self.thread_ts, question, None, None,
            owner=TERMINAL_OWNER, lease_until=TERMINAL_LEASE_UNTIL,
        )
        if stored is None:  # only a repeated Slack event or message id can do this; a chat has neither
            raise RuntimeError("the terminal question was not stored")
        conversation_id, message_id = stored
        history = self._store.start_answer(message_id, conversation_id, owner=TERMINAL_OWNER)
        self._out.write(ANSWER_PREFIX)
        view = TerminalView(self._out, interactive=self._interactive, start_column=text_width(ANSWER_PREFIX))
        try:
            reply = self._answerer.answer(history, question, view)
        except KeyboardInterrupt:
            self._store.set_status(message_id, "failed", "stopped with Ctrl-C in finbot chat")
            view.finish(for_terminal(messages_ko.CHAT_STOPPED))
            return None
        if reply.answer is None:
            self._store.set_status(message_id, "failed", reply.failure)
            view.finish(for_terminal(reply.notice or messages_ko.GENERATION_FAILED))
            return reply
        self._store.add_assistant_message(
            conversation_id, reply.answer, reply_to_id=message_id, slack_ts=None, owner=TERMINAL_OWNER
        )
        view.finish(reply.answer)
        return reply
