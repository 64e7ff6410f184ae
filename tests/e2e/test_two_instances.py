"""Two real `finbot run` processes on one PostgreSQL database and one fake Slack.

Slack may deliver an event to either connection of an app, and redeliver it to the other; the
fake sends each envelope to the newest connection only, so the test reorders the connections
to hand the same event id to both processes. Each question must be answered exactly once.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from bot import messages_ko
from tests.e2e.process import start_finbot
from tests.fakes.slack_server import FakeSlack

pytestmark = pytest.mark.e2e

QUESTIONS = 20


def send_to_both(fake: FakeSlack, event: dict, event_id: str) -> list[str]:
    """Deliver one event id to each of the two newest connections (newest first, then the other)."""
    envelopes = [fake.send_event(event, event_id=event_id)]
    with fake._lock:
        fake._conns[-1], fake._conns[-2] = fake._conns[-2], fake._conns[-1]
    try:
        envelopes.append(fake.send_event(event, event_id=event_id, retry_attempt=1, retry_reason="timeout"))
    finally:
        with fake._lock:
            fake._conns[-1], fake._conns[-2] = fake._conns[-2], fake._conns[-1]
    return envelopes


def test_two_instances_answer_each_event_once(tmp_path: Path, tiny_checkpoint, postgres_server):
    database_url = postgres_server.create_database()
    processes = []
    logs = [tmp_path / "finbot-a.log", tmp_path / "finbot-b.log"]
    with FakeSlack() as fake:
        settings = dict(
            SLACK_BOT_TOKEN=fake.bot_token, SLACK_APP_TOKEN=fake.app_token, SLACK_API_URL=fake.api_url,
            DATABASE_URL=database_url, ENGINE="fake", BASE_MODEL=str(tiny_checkpoint.base_dir),
            FAKE_REPLY="답변: {question}", FAKE_TOKENS_PER_SECOND="50",
        )
        try:
            for index, log in enumerate(logs):
                # One after the other: the first runs the migrations, the second finds them applied.
                processes.append(start_finbot("run", cwd=tmp_path, log_path=log, **settings))
                fake.wait_connected(timeout=60, count=index + 1)

            threads = []
            mentions = []
            for number in range(QUESTIONS):
                mention = fake.mention_event(f"질문 {number}번: 금리가 뭐야?", channel="C1", user=f"U{number:03d}")
                mentions.append(mention)
                worker = threading.Thread(target=send_to_both, args=(fake, mention, f"EvTwo{number}"))
                worker.start()
                threads.append(worker)
            for worker in threads:
                worker.join(30)

            def bot_messages(thread_ts: str) -> list[dict]:
                return [m for m in fake.messages(channel="C1", thread_ts=thread_ts) if m.get("bot_id") == fake.bot_id]

            def all_answered() -> bool:
                return all(
                    (got := bot_messages(m["ts"])) and all(x.get("text") not in ("", messages_ko.THINKING) for x in got)
                    and all(x.get("stream_state") != "streaming" for x in got)
                    for m in mentions
                )

            fake.wait_for(all_answered, timeout=60, description="every question answered")
            time.sleep(1.5)  # a duplicate answer would show up by now
            counts = {m["ts"]: len(bot_messages(m["ts"])) for m in mentions}
            assert set(counts.values()) == {1}, counts
            for number, mention in enumerate(mentions):
                assert f"질문 {number}번" in bot_messages(mention["ts"])[0]["text"]
            handled = [log.read_text(errors="replace").count("already handled") for log in logs]
            assert sum(handled) >= QUESTIONS  # every redelivery was recognised, by one process or the other
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process, log in zip(processes, logs, strict=False):
                assert process.wait(timeout=30) == 0, log.read_text(errors="replace")[-3000:]
    postgres_server.drop_database(database_url)
