"""Faults the real `finbot run` process must survive (issue 10), against the local fake Slack.

- the Slack Web API answering HTTP 5xx for a while in the middle of an answer,
- the Socket Mode connection dropped in the middle of an answer,
- the engine failing one request (out of memory, a CUDA error; `FAKE_FAIL_ON`),
- PostgreSQL restarted in the middle of an answer.

Each test asserts what a user would notice: the answer (or the apology) in the thread, exactly
once, and the next question answered by the same process. The answers are slow on purpose
(`FAKE_TOKENS_PER_SECOND`) so that the fault lands while one is being written.

`FINBOT_FAULT_OUTAGE_S` sets the length of the long Slack outage (default 20 s, what the product
must survive).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot import messages_ko
from bot.formatting import to_mrkdwn
from tests.e2e.process import slack_settings, start_finbot
from tests.fakes.slack_server import FakeSlack
from tests.postgres import RestartablePostgres, find_pg_bin_dir, restartable_postgres_server

pytestmark = pytest.mark.e2e

OUTAGE_S = float(os.environ.get("FINBOT_FAULT_OUTAGE_S", "20"))
# The fake engine's answer: 20 chunks (one per word) at 8 per second, so about 2.5 s of writing.
REPLY = (
    "{question} 에 대한 답변이에요. 첫째 금리는 돈의 가격이에요. 둘째 중앙은행이 기준금리를 정해요. "
    "셋째 물가가 오르면 금리를 올려요. 마지막으로 정리하면 끝이에요."
)
TOKENS_PER_SECOND = "8"
# FAKE_FAIL_ON: questions containing these fail in the engine (see llm/fault_injection.py).
OOM_MARKER = "메모리폭탄"
CUDA_MARKER = "장치오류"
FAIL_ON = f"oom:{OOM_MARKER};cuda:{CUDA_MARKER}"
INJECTED = "injected by FAKE_FAIL_ON"


def expected_answer(question: str) -> str:
    """The answer to `question` as stored: the fake engine's words (nothing in them to clean)."""
    return REPLY.format(question=question)


def shown_answer(question: str) -> str:
    """The answer to `question` as Slack shows it."""
    return to_mrkdwn(expected_answer(question))


@dataclass
class Bot:
    fake: FakeSlack
    process: subprocess.Popen[bytes]
    log: Path
    cwd: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def bot_messages(self, channel: str, thread_ts: str) -> list[dict]:
        return [
            m for m in self.fake.messages(channel=channel, thread_ts=thread_ts)
            if m["ts"] != thread_ts and m.get("bot_id") == self.fake.bot_id
        ]

    def ask(self, channel: str, question: str) -> str:
        """Mention the bot with `question` in `channel`; returns the thread ts."""
        mention = self.fake.mention_event(question, channel=channel)
        self.fake.wait_acked(self.fake.send_event(mention), timeout=30)
        return mention["ts"]

    def wait_final(
        self, channel: str, thread_ts: str, done: Callable[[dict], bool] | None = None, timeout: float = 60
    ) -> dict:
        """The bot's finished reply in the thread: its 👍/👎 buttons (or `done`), no stream still open."""
        done = done or (lambda m: any(b.get("block_id") == "finbot_feedback" for b in m.get("blocks") or []))

        def finished() -> dict | None:
            for message in self.bot_messages(channel, thread_ts):
                if message.get("stream_state") != "streaming" and done(message):
                    return message
            return None

        return self.fake.wait_for(finished, timeout=timeout, description=f"the finished reply in {channel}/{thread_ts}")

    def wait_streaming(self, channel: str, thread_ts: str, appends: int = 1, timeout: float = 30) -> None:
        """Wait until the answer is being streamed into the thread (`appends` chat.appendStream calls done)."""

        def streaming() -> bool:
            starts = [
                c for c in self.fake.calls_to("chat.startStream")
                if c.params.get("thread_ts") == thread_ts and c.status == 200 and (c.response or {}).get("ok")
            ]
            if not starts:
                return False
            stream_ts = starts[0].response["ts"]
            ok = [
                c for c in self.fake.calls_to("chat.appendStream")
                if c.params.get("ts") == stream_ts and c.status == 200 and (c.response or {}).get("ok")
            ]
            return len(ok) >= appends

        self.fake.wait_for(streaming, timeout=timeout, description=f"the answer streaming in {channel}/{thread_ts}")

    def assert_answered_once(self, channel: str, thread_ts: str, question: str, timeout: float = 60) -> dict:
        answer = self.wait_final(channel, thread_ts, timeout=timeout)
        # A duplicate (a retried post, a second stream, a redelivered event) would show up by now.
        time.sleep(1.0)
        messages = self.bot_messages(channel, thread_ts)
        assert len(messages) == 1, self.fake.dump()
        assert messages[0]["text"] == shown_answer(question), messages[0]["text"]
        assert messages[0].get("stream_state") in (None, "stopped")
        return answer


def check_log(output: str, fake: FakeSlack, allowed_traceback: str | None = None) -> None:
    """No Slack token in the log; a traceback only for the engine fault a test injected on purpose."""
    assert fake.bot_token not in output and fake.app_token not in output
    for block in output.split("Traceback (most recent call last):")[1:]:
        # A traceback ends with the exception's line: the first line not indented after the frames.
        last = next((line for line in block.splitlines()[1:] if line and not line.startswith(" ")), "")
        assert allowed_traceback is not None and allowed_traceback in last, output[-5000:]


@contextmanager
def finbot_process(
    fake: FakeSlack, cwd: Path, allowed_traceback: str | None = None, **settings: str
) -> Iterator[Bot]:
    """`finbot run` in Socket Mode against `fake`; on the way out: a clean exit, a clean log."""
    log = cwd / "finbot.log"
    process = start_finbot("run", cwd=cwd, log_path=log, **{**slack_settings(fake), **settings})
    try:
        fake.wait_connected(timeout=90)
        yield Bot(fake, process, log, cwd)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            exit_code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    output = log.read_text(errors="replace")
    assert exit_code == 0, output[-5000:]
    check_log(output, fake, allowed_traceback)


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint) -> Iterator[Bot]:
    """One `finbot run` on SQLite for the Slack and engine faults (each test in its own channel)."""
    cwd = tmp_path_factory.mktemp("faults")
    with (
        FakeSlack() as fake,
        finbot_process(
            fake,
            cwd,
            DATABASE_URL=f"sqlite:///{cwd / 'finbot.db'}",
            ENGINE="fake",
            BASE_MODEL=str(tiny_checkpoint.base_dir),
            FAKE_REPLY=REPLY,
            FAKE_TOKENS_PER_SECOND=TOKENS_PER_SECOND,
            FAKE_FAIL_ON=FAIL_ON,
        ) as running,
    ):
        yield running


def sqlite_rows(bot: Bot, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(bot.cwd / "finbot.db") as connection:
        return connection.execute(sql, args).fetchall()


# ---------------------------------------------------------------------------------------------
# 1. The Slack Web API answering 5xx for a while


@pytest.mark.parametrize(
    ("channel", "status", "seconds", "methods", "json_body"),
    [
        # Slack down for OUTAGE_S: every call answers 503 with Slack's JSON error body.
        pytest.param("C5XXALL", 503, OUTAGE_S, None, True, id="503-json-every-method"),
        # A load balancer's HTML 500 page for the calls that end an answer, while the stream runs on.
        pytest.param(
            "C5XXEND", 500, 4.5, ("chat.stopStream", "chat.update", "chat.postMessage"), False,
            id="500-html-final-calls",
        ),
    ],
)
def test_slack_server_errors_mid_answer_are_retried_and_the_answer_posted_once(
    bot: Bot, channel: str, status: int, seconds: float, methods: tuple[str, ...] | None, json_body: bool
):
    fake = bot.fake
    log_offset = len(bot.log_text())
    calls_offset = len(fake.calls)
    question = f"금리가 뭐야? ({channel})"
    thread = bot.ask(channel, question)
    bot.wait_streaming(channel, thread)
    fake.fail_server_errors(status=status, seconds=seconds, methods=methods, json_body=json_body)
    try:
        bot.assert_answered_once(channel, thread, question, timeout=seconds + 90)
    finally:
        fake.end_server_errors()  # never left running into the next test of this process
    # The outage hit this answer: its calls were refused (the final ones too), and each was retried.
    refused = [c for c in fake.calls[calls_offset:] if c.status >= 500]
    assert refused and all(c.params.get("channel") == channel for c in refused), fake.dump()
    if methods is not None:
        assert {c.method for c in refused} <= set(methods) and "chat.stopStream" in {c.method for c in refused}
    log = bot.log_text()[log_offset:]
    retries = re.findall(r"WARNING .*Slack API (\S+) answered HTTP (\d+); retry \d+", log)
    assert sorted(method for method, _ in retries) == sorted(c.method for c in refused), log[-3000:]
    assert {int(code) for _, code in retries} == {status}

    # The process goes on answering.
    after = "그럼 환율은?"
    bot.assert_answered_once(channel, bot.ask(channel, after), after)


def test_bot_web_client_retries_5xx_with_a_warning_per_retry_and_posts_once(caplog: pytest.LogCaptureFixture):
    """The retry policy itself (bot.app.slack_retry_handlers), in-process, against the fake's outage."""
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    from bot.app import slack_retry_handlers

    with FakeSlack() as fake:
        plain = WebClient(base_url=fake.api_url, token=fake.bot_token)
        bots = WebClient(base_url=fake.api_url, token=fake.bot_token, retry_handlers=slack_retry_handlers())
        fake.fail_server_errors(status=500, seconds=1.5, methods="chat.postMessage", json_body=False)
        with pytest.raises(SlackApiError) as refused:
            plain.chat_postMessage(channel="C1", text="그냥 클라이언트")
        assert refused.value.response.status_code == 500
        assert plain.auth_test()["ok"]  # other methods are not in this outage
        with caplog.at_level("WARNING", logger="bot.app"):
            posted = bots.chat_postMessage(channel="C1", text="재시도하는 클라이언트")
        assert posted["ok"]
        assert [m["text"] for m in fake.messages("C1")] == ["재시도하는 클라이언트"]
        warnings = [r.getMessage() for r in caplog.records if r.name == "bot.app"]
        assert len(warnings) == len(fake.server_error_calls("chat.postMessage")) - 1  # the plain client's
        assert all(w.startswith("Slack API chat.postMessage answered HTTP 500; retry") for w in warnings)
        assert not any(fake.bot_token in w for w in warnings)


# ---------------------------------------------------------------------------------------------
# 2. The Socket Mode connection dropped


def test_socket_mode_drop_mid_answer_answer_completes_and_bot_reconnects(bot: Bot):
    fake = bot.fake
    channel = "CDROP"
    question = "인플레이션이 뭐야?"
    thread = bot.ask(channel, question)
    bot.wait_streaming(channel, thread)
    connections = fake.total_connections
    fake.drop_connections()

    bot.assert_answered_once(channel, thread, question)
    fake.wait_for(
        lambda: fake.total_connections > connections and fake.connection_count >= 1,
        timeout=60,
        description="the bot's Socket Mode client reconnecting",
    )
    after = "디플레이션은?"
    bot.assert_answered_once(channel, bot.ask(channel, after), after)


# ---------------------------------------------------------------------------------------------
# 3. The engine failing one request


@pytest.mark.parametrize(
    ("channel", "marker", "reason"),
    [
        # Before any text (prefill): the apology is the thread's only reply.
        pytest.param("COOM", OOM_MARKER, "OutOfMemoryError", id="out-of-memory"),
        # After the first words were streamed: the apology replaces them.
        pytest.param("CCUDA", CUDA_MARKER, "CUDA error: an illegal memory access was encountered", id="cuda-error"),
    ],
)
def test_engine_failure_gets_an_apology_and_the_next_question_is_answered(
    bot: Bot, channel: str, marker: str, reason: str
):
    thread = bot.ask(channel, f"{marker} 때문에 실패할 질문이에요")
    apology = bot.wait_final(channel, thread, done=lambda m: m.get("text") == messages_ko.GENERATION_FAILED)
    time.sleep(1.0)  # a second reply would show up by now
    assert [m["text"] for m in bot.bot_messages(channel, thread)] == [messages_ko.GENERATION_FAILED]
    assert not apology.get("blocks")  # no 👍/👎 under an apology
    streamed = any(c.params.get("thread_ts") == thread for c in bot.fake.calls_to("chat.startStream"))
    assert streamed == (marker == CUDA_MARKER)

    [(status, error)] = sqlite_rows(
        bot, "select status, error from messages where role = 'user' and slack_ts = ?", thread
    )
    assert status == "failed"
    assert reason in error and INJECTED in error
    assert sqlite_rows(
        bot, "select count(*) from messages where role = 'assistant' and reply_to_id = "
        "(select id from messages where slack_ts = ?)", thread,
    ) == [(0,)]

    # The operator gets one line naming the fault, not a stack trace.
    failure_lines = [line for line in bot.log_text().splitlines() if "generation failed for question" in line]
    assert failure_lines and all(INJECTED in line and " ERROR " in line for line in failure_lines), failure_lines

    # The same process answers the next question, in the same channel.
    question = "그럼 채권은 뭐야?"
    bot.assert_answered_once(channel, bot.ask(channel, question), question)
    assert bot.process.poll() is None


# ---------------------------------------------------------------------------------------------
# 4. PostgreSQL restarted


@pytest.fixture
def restartable_postgres() -> Iterator[RestartablePostgres]:
    if find_pg_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run installs Debian's postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("the psycopg driver is not installed (pip install -e '.[test]')")
    with restartable_postgres_server() as server:
        yield server


def test_postgres_restart_mid_answer_answer_stored_after_reconnecting(
    tmp_path: Path, tiny_checkpoint, restartable_postgres: RestartablePostgres
):
    import psycopg

    database_url = restartable_postgres.server.create_database()
    with (
        FakeSlack() as fake,
        finbot_process(
            fake,
            tmp_path,
            DATABASE_URL=database_url,
            ENGINE="fake",
            BASE_MODEL=str(tiny_checkpoint.base_dir),
            FAKE_REPLY=REPLY,
            FAKE_TOKENS_PER_SECOND=TOKENS_PER_SECOND,
        ) as bot,
    ):
        channel = "CPG"
        question = "예금자 보호 제도가 뭐야?"
        log_offset = len(bot.log_text())
        thread = bot.ask(channel, question)
        bot.wait_streaming(channel, thread)
        restartable_postgres.stop()
        # Down until the answer, written, is being stored and finds the database gone (or long
        # enough for that to have happened: the fault is the same without the product's warning).
        storing = re.compile(r"WARNING storage\.db \[finbot-answer[^\]]*\] database unreachable")
        with suppress(AssertionError):
            fake.wait_for(
                lambda: storing.search(bot.log_text()[log_offset:]), timeout=15,
                description="the answer waiting for the database",
            )
        restartable_postgres.start()

        bot.assert_answered_once(channel, thread, question, timeout=90)
        assert bot.process.poll() is None  # still the same process: no crash, no restart
        with psycopg.connect(database_url.replace("postgresql+psycopg", "postgresql")) as connection:
            rows = connection.execute(
                "select q.status, a.text from messages q left join messages a on a.reply_to_id = q.id "
                "where q.role = 'user' and q.slack_ts = %s", (thread,),
            ).fetchall()
        assert rows == [("answered", expected_answer(question))]

        after = "그럼 한도는 얼마야?"
        bot.assert_answered_once(channel, bot.ask(channel, after), after)
        assert bot.log_text().count("finbot is ready") == 1
    restartable_postgres.server.drop_database(database_url)
