"""ENGINE=openai against a real OpenAI-compatible server (issue 13): `transformers serve` on the CPU,
serving the tiny model exported with `finbot export-merged`, behind the real `finbot run`.

- the server slow to start: finbot is up first, /readyz says the engine is not answering until
  the server is, then answers stream in;
- the server killed in the middle of an answer: the user gets the apology, the question stays
  stored (failed, with the reason), and once the server is back the thread is answered again.

Skipped where `transformers serve` is not installed (`pip install 'transformers[serving]'`;
`.ci/run` installs it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot import messages_ko
from tests.e2e.process import finbot_env, run_finbot
from tests.e2e.test_operations import Bot, finbot_run, free_port
from tests.fakes.slack_server import FakeSlack

TRANSFORMERS_CLI = Path(sys.executable).parent / "transformers"


def _serve_installed() -> bool:
    return TRANSFORMERS_CLI.exists() and all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai"))


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not _serve_installed(),
        reason="`transformers serve` is not installed: pip install 'transformers[serving]' (.ci/run installs it)",
    ),
]

# Short answers (the tiny model writes ~15-50 tokens a second on a CI CPU) that still take long
# enough for the server to be killed in the middle of one.
MAX_NEW_TOKENS = "48"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


@dataclass
class TransformersServe:
    """`transformers serve MODEL` on the CPU, in its own process group (it may start helpers)."""

    model: Path
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(TRANSFORMERS_CLI), "serve", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                 "--device", "cpu"],
                env=finbot_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while _get(f"http://127.0.0.1:{self.port}/health")[0] != 200:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"transformers serve not up after {timeout} s"
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL to the server and anything it started: a crash, not a shutdown."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture(scope="module")
def merged_model(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("served") / "finbot-merged"
    result = run_finbot(
        "export-merged", str(out), cwd=out.parent,
        BASE_MODEL=str(tiny_checkpoint.base_dir), ADAPTER=str(tiny_checkpoint.adapter_dir), DEVICE="cpu",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@dataclass
class Served:
    bot: Bot
    server: TransformersServe
    metrics_port: int
    database: Path

    def readyz(self) -> dict:
        status, body = _get(f"http://127.0.0.1:{self.metrics_port}/readyz")
        report = json.loads(body) if body else {}
        assert (status == 200) == report.get("ready", False)
        return report

    def ask(self, channel: str, text: str, thread_ts: str | None = None) -> str:
        event = self.bot.fake.mention_event(text, channel=channel, thread_ts=thread_ts)
        self.bot.fake.wait_acked(self.bot.fake.send_event(event), timeout=30)
        return event["ts"]

    def rows(self, sql: str, *args: object) -> list[tuple]:
        with sqlite3.connect(self.database) as connection:
            return connection.execute(sql, args).fetchall()


@pytest.fixture(scope="module")
def served(merged_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    cwd = tmp_path_factory.mktemp("openai-bot")
    server = TransformersServe(merged_model, free_port(), cwd / "transformers-serve.log")
    metrics_port = free_port()
    try:
        with FakeSlack() as fake, finbot_run(
            fake, cwd,
            DATABASE_URL=f"sqlite:///{cwd / 'finbot.db'}",
            ENGINE="openai",
            BASE_MODEL=str(merged_model),  # the tokenizer that builds the prompts
            OPENAI_BASE_URL=f"http://127.0.0.1:{server.port}/v1",
            OPENAI_MODEL=str(merged_model),  # transformers serve names a model by its directory
            OPENAI_SERVER="transformers",
            OPENAI_PROMPT_FORMAT="text",
            OPENAI_TIMEOUT_S="120",
            MAX_NEW_TOKENS=MAX_NEW_TOKENS,
            STREAM_FLUSH_SECONDS="0.2",
            METRICS_PORT=str(metrics_port),
            METRICS_HOST="127.0.0.1",
        ) as bot:
            yield Served(bot, server, metrics_port, cwd / "finbot.db")
    finally:
        server.kill()


def test_a_server_slow_to_start_makes_finbot_unready_until_it_answers_then_answers_stream(served: Served):
    fake = served.bot.fake
    # finbot is up and connected to Slack, the inference server not yet.
    checks = fake.wait_for(lambda: served.readyz().get("checks"), timeout=30, description="a readiness report")
    assert checks["engine"].startswith("failed") and checks["slack"] == "ok"

    served.server.start()
    served.server.wait_healthy()
    fake.wait_for(lambda: served.readyz().get("ready"), timeout=60, interval=0.5, description="ready with the server")

    thread = served.ask("CSERVE1", "기준금리가 뭐야?")
    answer = served.bot.wait_final("CSERVE1", thread)
    # Streamed: the message grew before it was final.
    [start] = [c for c in fake.calls_to("chat.startStream") if c.params.get("thread_ts") == thread]
    assert start.response["ts"] == answer["ts"]
    assert answer["text"].strip()
    [(status, stored)] = served.rows(
        "select q.status, a.text from messages q join messages a on a.reply_to_id = q.id where q.slack_ts = ?", thread
    )
    assert status == "answered" and stored.strip()


def test_the_server_killed_mid_answer_gets_an_apology_and_the_thread_is_answered_once_it_is_back(served: Served):
    fake = served.bot.fake
    served.server.wait_healthy()
    thread = served.ask("CSERVE2", "인플레이션을 아주 길게 설명해줘")
    fake.wait_for(
        lambda: [c for c in fake.calls_to("chat.startStream") if c.params.get("thread_ts") == thread],
        timeout=60, interval=0.01, description="the answer streaming",
    )
    served.server.kill()

    served.bot.wait_final("CSERVE2", thread, done=lambda m: m.get("text") == messages_ko.GENERATION_FAILED)
    [(status, error)] = served.rows("select status, error from messages where slack_ts = ?", thread)
    assert status == "failed" and "inference server" in error  # the question is kept, with the reason
    fake.wait_for(lambda: not served.readyz().get("ready"), timeout=30, interval=0.5, description="unready")

    served.server.start()
    served.server.wait_healthy()
    fake.wait_for(lambda: served.readyz().get("ready"), timeout=60, interval=0.5, description="ready again")
    again = served.ask("CSERVE2", "다시 설명해줘", thread_ts=thread)
    answer = served.bot.wait_final("CSERVE2", thread, done=lambda m: any(
        b.get("block_id") == "finbot_feedback" for b in m.get("blocks") or []
    ))
    assert answer["ts"] != thread
    assert served.rows("select status from messages where slack_ts = ?", again) == [("answered",)]
