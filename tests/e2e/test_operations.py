"""Metrics and health checks of the real `finbot run` (issue 13), scraped over HTTP like Prometheus would.

One process (Socket Mode, the fake Slack, the fake engine, a throwaway PostgreSQL that the test
may stop) serves the whole module; each test asks in its own channels with its own users, so the
per-user rate limit applies to one test only.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot import messages_ko
from tests.e2e.process import slack_settings, start_finbot
from tests.fakes.slack_server import FakeSlack

pytestmark = pytest.mark.e2e

# One fake-engine word is one chunk; at 20 words a second an answer of ~10 words takes 0.5 s and the
# timeout question's ~45 words take over 2 s, past GENERATION_TIMEOUT_S.
REPLY = "{question} 에 대한 답변이에요. 금리는 돈의 가격이에요. 끝이에요."
OOM_MARKER = "메모리폭탄"
INJECTED = "injected by FAKE_FAIL_ON"
SLOW_QUESTION = "천천히 " + "a " * 40


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class StoppablePostgres:
    """A private PostgreSQL server (tests/postgres.py's) that a test stops and starts again."""

    bin_dir: Path
    root: Path
    url: str
    stop_for_good: Callable[[], None]
    _options: str = field(default="", init=False)

    def _pg_ctl(self, *args: str) -> None:
        from tests.postgres import _run_as

        user = self.root.owner() if os.geteuid() == 0 else None
        subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), *args],
            check=True, capture_output=True, cwd=self.root, timeout=60,
            env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}, **_run_as(user),  # type: ignore[arg-type]
        )

    def stop(self) -> None:
        # The server's own command line (port, socket directory, settings) for the next start.
        options = (self.root / "data" / "postmaster.opts").read_text().strip()
        self._options = shlex.join(shlex.split(options)[3:])  # without the binary and its "-D DIR"
        self._pg_ctl("-m", "fast", "-w", "stop")

    def start(self) -> None:
        self._pg_ctl("-l", str(self.root / "postgres.log"), "-o", self._options, "-w", "-t", "60", "start")


@contextmanager
def stoppable_postgres() -> Iterator[StoppablePostgres | None]:
    """A throwaway server, or None where PostgreSQL is not installed."""
    from tests.postgres import find_pg_bin_dir, start_postgres

    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="finbot-pg-ops-"))
    os.chmod(root, 0o755)
    try:
        server, stop = start_postgres(bin_dir, root)
        try:
            yield StoppablePostgres(bin_dir, root, server.create_database(), stop)
        finally:
            stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Bot:
    fake: FakeSlack
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_final(self, channel: str, thread_ts: str, done: Callable[[dict], bool] | None = None) -> dict:
        """The bot's finished reply in the thread: its 👍/👎 buttons (or `done`), no stream still open."""
        done = done or (lambda m: any(b.get("block_id") == "finbot_feedback" for b in m.get("blocks") or []))

        def finished() -> dict | None:
            for message in self.fake.messages(channel=channel, thread_ts=thread_ts):
                if (message.get("bot_id") == self.fake.bot_id and message.get("stream_state") != "streaming"
                        and done(message)):
                    return message
            return None

        return self.fake.wait_for(finished, timeout=60, description=f"the finished reply in {channel}/{thread_ts}")


@contextmanager
def finbot_run(fake: FakeSlack, cwd: Path, **settings: str) -> Iterator[Bot]:
    """`finbot run` against `fake`; on the way out a clean exit, no token in the log, and no
    traceback but the engine fault injected on purpose."""
    log = cwd / "finbot.log"
    process = start_finbot("run", cwd=cwd, log_path=log, **{**slack_settings(fake), **settings})
    try:
        fake.wait_connected(timeout=90)
        yield Bot(fake, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            exit_code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    output = log.read_text(errors="replace")
    assert exit_code == 0, output[-5000:]
    assert fake.bot_token not in output and fake.app_token not in output
    for block in output.split("Traceback (most recent call last):")[1:]:
        last = next((line for line in block.splitlines()[1:] if line and not line.startswith(" ")), "")
        assert INJECTED in last, output[-5000:]


@dataclass
class Monitored:
    bot: Bot
    port: int
    postgres: StoppablePostgres | None

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=15) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except OSError:  # not listening yet
            return 0, b""

    def metrics_text(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body.decode()

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    def readyz(self) -> tuple[int, dict]:
        status, body = self.get("/readyz")
        return status, json.loads(body) if status else {"ready": None}

    def wait_readiness(self, ready: bool, failing: str | None = None, timeout: float = 60) -> dict:
        def matches() -> dict | None:
            status, report = self.readyz()
            if (status == 200) != ready or report["ready"] != ready:
                return None
            if failing is not None and not report["checks"].get(failing, "").startswith("failed"):
                return None
            return report

        return self.bot.fake.wait_for(
            matches, timeout=timeout, interval=0.5, description=f"/readyz ready={ready} failing={failing}"
        )


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint) -> Iterator[Monitored]:
    cwd = tmp_path_factory.mktemp("operations")
    port = free_port()
    with stoppable_postgres() as postgres, FakeSlack() as fake, finbot_run(
        fake,
        cwd,
        DATABASE_URL=postgres.url if postgres is not None else f"sqlite:///{cwd / 'finbot.db'}",
        ENGINE="fake",
        BASE_MODEL=str(tiny_checkpoint.base_dir),
        FAKE_REPLY=REPLY,
        FAKE_TOKENS_PER_SECOND="20",
        FAKE_FAIL_ON=f"oom:{OOM_MARKER}",
        METRICS_PORT=str(port),
        METRICS_HOST="127.0.0.1",
        RATE_LIMIT_PER_USER="2",
        MAX_PROMPT_TOKENS="128",
        GENERATION_TIMEOUT_S="1.5",
    ) as bot:
        yield Monitored(bot, port, postgres)


def _ask(bot: Bot, channel: str, user: str, question: str, reply: str | None = None) -> dict:
    """Ask as `user`; returns the finished reply (the answer with 👍/👎, or the Korean `reply`)."""
    mention = bot.fake.mention_event(question, channel=channel, user=user)
    bot.fake.wait_acked(bot.fake.send_event(mention), timeout=30)
    done = None if reply is None else (lambda m: m.get("text") == reply)
    return bot.wait_final(channel, mention["ts"], done=done)


def test_counters_and_histograms_move_with_answers_refusals_and_failures(monitored: Monitored):
    bot = monitored.bot
    before = monitored.scrape()

    answer = _ask(bot, "COPS1", "UOPS1", "금리가 뭐야?")
    # The metrics are recorded just after the final message is posted, so a scrape can come first.
    answered_before = value(before, "finbot_questions_total", outcome="answered", reason="")

    def answer_counted() -> dict | None:
        samples = monitored.scrape()
        return samples if value(samples, "finbot_questions_total", outcome="answered", reason="") > answered_before else None

    after = bot.fake.wait_for(answer_counted, timeout=15, interval=0.05, description="the answer counted")
    assert value(after, "finbot_questions_total", outcome="answered", reason="") == answered_before + 1
    for histogram in ("finbot_first_text_seconds", "finbot_answer_seconds", "finbot_answer_tokens_per_second"):
        assert value(after, f"{histogram}_count") == value(before, f"{histogram}_count") + 1, histogram
    first_text = value(after, "finbot_first_text_seconds_sum") - value(before, "finbot_first_text_seconds_sum")
    whole = value(after, "finbot_answer_seconds_sum") - value(before, "finbot_answer_seconds_sum")
    # The fake engine writes ~12 words at 20 a second: the first text comes well before the end.
    assert 0 < first_text < whole < 10
    assert value(after, "finbot_generated_tokens_total") - value(before, "finbot_generated_tokens_total") >= 12
    assert value(after, "finbot_slack_api_calls_total", method="chat.startStream", error="none") > value(
        before, "finbot_slack_api_calls_total", method="chat.startStream", error="none"
    )

    # 👍 on the answer.
    [button] = [b for b in answer["blocks"] if b.get("block_id") == "finbot_feedback"]
    up = next(e for e in button["elements"] if e["action_id"] == "finbot_feedback_up")
    bot.fake.send_interactive({
        "user": {"id": "UOPS1", "team_id": bot.fake.team_id},
        "channel": {"id": "COPS1"},
        "message": answer,
        "container": {"type": "message", "channel_id": "COPS1", "message_ts": answer["ts"]},
        "actions": [{"action_id": "finbot_feedback_up", "block_id": "finbot_feedback", "value": up["value"],
                     "type": "button", "action_ts": str(time.time())}],
    })
    bot.fake.wait_for(
        lambda: value(monitored.scrape(), "finbot_feedback_votes_total", vote="up")
        == value(before, "finbot_feedback_votes_total", vote="up") + 1,
        timeout=15, description="the 👍 counted",
    )

    # Refused: over the per-user limit (2 a minute), and too long for MAX_PROMPT_TOKENS.
    _ask(bot, "COPS2", "UOPSRATE", "환율이 뭐야?")
    _ask(bot, "COPS2", "UOPSRATE", "채권은?")
    _ask(bot, "COPS2", "UOPSRATE", "주식은?", reply=messages_ko.RATE_LIMITED_USER)
    _ask(bot, "COPS3", "UOPS3", "인플레이션을 " * 120, reply=messages_ko.QUESTION_TOO_LONG)
    # Failed: the engine fails (injected out of memory), and an answer runs past GENERATION_TIMEOUT_S,
    # during which the engine and the pipeline report it running.
    _ask(bot, "COPS4", "UOPS4", f"{OOM_MARKER} 질문", reply=messages_ko.GENERATION_FAILED)
    slow = bot.fake.mention_event(SLOW_QUESTION, channel="COPS5", user="UOPS5")
    bot.fake.send_event(slow)

    def reported_running() -> dict | None:
        samples = monitored.scrape()
        return samples if value(samples, "finbot_engine_running_requests") == 1 else None

    running = bot.fake.wait_for(reported_running, timeout=15, interval=0.05, description="the slow answer running")
    assert value(running, "finbot_questions_in_progress", state="answering") == 1
    bot.wait_final("COPS5", slow["ts"], done=lambda m: m.get("text") == messages_ko.GENERATION_TIMED_OUT)


    def settled() -> dict | None:
        # The engine lets go of the stopped request just after the apology is posted.
        samples = monitored.scrape()
        return samples if value(samples, "finbot_engine_running_requests") == 0 else None

    final = bot.fake.wait_for(settled, timeout=15, interval=0.05, description="the stopped request released")
    for outcome, reason, delta in [
        ("answered", "", 3),
        ("refused", "rate_limit", 1),
        ("refused", "too_long", 1),
        ("failed", "engine_error", 1),
        ("failed", "timeout", 1),
        ("refused", "busy", 0),
    ]:
        moved = value(final, "finbot_questions_total", outcome=outcome, reason=reason) - value(
            before, "finbot_questions_total", outcome=outcome, reason=reason
        )
        assert moved == delta, (outcome, reason, moved)
    assert value(final, "finbot_engine_running_requests") == 0
    assert value(final, "finbot_first_text_seconds_count") == value(before, "finbot_first_text_seconds_count") + 3
    assert value(final, "finbot_start_time_seconds") > time.time() - 600
    [build] = [labels for (name, labels) in final if name == "finbot_build_info"]
    assert dict(build)["engine"] == "fake" and dict(build)["version"]

    # Nothing personal in the labels: no user, channel or question text.
    text = monitored.metrics_text()
    for private in ("UOPS", "COPS", "금리가", "인플레이션", OOM_MARKER):
        assert private not in text, private


def test_readyz_follows_the_database_and_slack_and_healthz_stays_up(monitored: Monitored):
    bot, fake = monitored.bot, monitored.bot.fake
    report = monitored.wait_readiness(True)
    assert set(report["checks"]) == {"database", "slack", "engine"}
    assert monitored.get("/healthz") == (200, b"ok\n")

    if monitored.postgres is not None:
        monitored.postgres.stop()
        try:
            report = monitored.wait_readiness(False, failing="database", timeout=30)
            assert report["checks"]["slack"] == "ok"
            assert monitored.get("/healthz")[0] == 200
        finally:
            monitored.postgres.start()
        monitored.wait_readiness(True, timeout=30)

    # Slack goes away: the WebSocket drops and the Web API (which issues the next one) answers 503.
    fake.fail_server_errors(status=503, seconds=6)
    fake.drop_connections()
    try:
        report = monitored.wait_readiness(False, failing="slack", timeout=30)
        assert report["checks"]["database"] == "ok"
        assert monitored.get("/healthz")[0] == 200
    finally:
        fake.end_server_errors()  # Slack is back
    monitored.wait_readiness(True, timeout=60)
    # Still answering after both outages.
    _ask(bot, "COPS6", "UOPS6", "예금은?")
    log = bot.log_text()
    assert "readiness: not ready" in log and "readiness: ready" in log
    if monitored.postgres is None:
        pytest.skip("the database part needs PostgreSQL (initdb, pg_ctl); the Slack part ran")


def test_a_taken_metrics_port_stops_the_start_with_a_message_naming_the_setting(tmp_path: Path):
    from tests.e2e.process import run_finbot

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_finbot(
            "run", cwd=tmp_path, timeout=60,
            SLACK_BOT_TOKEN="xoxb-test", SLACK_APP_TOKEN="xapp-test", METRICS_PORT=str(port),
            METRICS_HOST="127.0.0.1", DATABASE_URL=f"sqlite:///{tmp_path / 'finbot.db'}", ENGINE="fake",
        )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"METRICS_PORT={port} on METRICS_HOST=127.0.0.1 is already in use" in output
    assert "METRICS_PORT=0" in output and "Traceback" not in output
    assert not (tmp_path / "finbot.db").exists()  # stopped before touching the database or the model


def test_http_mode_serves_the_same_checks_next_to_slacks_request_port(tmp_path: Path, tiny_checkpoint):
    metrics_port, http_port = free_port(), free_port()
    with FakeSlack() as fake:
        process = start_finbot(
            "run", cwd=tmp_path, log_path=tmp_path / "finbot.log",
            SLACK_MODE="http", HTTP_HOST="127.0.0.1", HTTP_PORT=str(http_port), SLACK_SIGNING_SECRET="s3cret",
            SLACK_BOT_TOKEN=fake.bot_token, SLACK_API_URL=fake.api_url,
            DATABASE_URL=f"sqlite:///{tmp_path / 'finbot.db'}", ENGINE="fake", BASE_MODEL=str(tiny_checkpoint.base_dir),
            METRICS_PORT=str(metrics_port), METRICS_HOST="127.0.0.1",
        )
        try:
            monitored = Monitored(Bot(fake, tmp_path / "finbot.log"), metrics_port, None)
            report = monitored.wait_readiness(True, timeout=90)
            assert report["checks"] == {"database": "ok", "slack": "ok", "engine": "ok"}  # the probe ran
            assert monitored.get("/healthz") == (200, b"ok\n")
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
    assert "Traceback" not in (tmp_path / "finbot.log").read_text()
