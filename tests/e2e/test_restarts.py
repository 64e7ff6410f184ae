"""Restarts and kills of the real `finbot run` mid-answer: every question answered once, in place.

A slow fake engine keeps an answer streaming while the test stops (SIGTERM, the deploy path) or
kills (SIGKILL: out-of-memory killer, host failure) the process answering it. The question must
then be answered by the restarted process or by a second instance still running: one bot message
in the thread, holding the whole answer, no stream left open, and nothing answered twice.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from bot import messages_ko
from tests.e2e.process import run_finbot, slack_settings, start_finbot
from tests.fakes.slack_server import FakeSlack

pytestmark = pytest.mark.e2e

FAKE_REPLY = "답변 시작: {question}. " + "설명을 이어서 드립니다. " * 12 + "이상으로 답변을 마칩니다."
LAST_WORDS = "이상으로 답변을 마칩니다."


def finbot_settings(fake: FakeSlack, database_url: str, tiny_checkpoint, **extra: str) -> dict[str, str]:
    return {
        **slack_settings(fake),
        "DATABASE_URL": database_url, "ENGINE": "fake", "BASE_MODEL": str(tiny_checkpoint.base_dir),
        "FAKE_REPLY": FAKE_REPLY, "FAKE_TOKENS_PER_SECOND": "12", "SHUTDOWN_DEADLINE_S": "0.5",
        "QUESTION_LEASE_S": "6", "STREAM_FLUSH_SECONDS": "0.2", **extra,
    }


def bot_messages(fake: FakeSlack, thread_ts: str) -> list[dict]:
    return [m for m in fake.messages(channel="C1", thread_ts=thread_ts) if m.get("bot_id") == fake.bot_id]


def wait_streaming(fake: FakeSlack, thread_ts: str) -> None:
    """Until part of the answer is visible in the thread, and not all of it."""
    fake.wait_for(
        lambda: any("설명을 이어서" in m.get("text", "") for m in bot_messages(fake, thread_ts)),
        timeout=60, description="the answer streaming",
    )
    assert not any(LAST_WORDS in m.get("text", "") for m in bot_messages(fake, thread_ts))


def wait_answered_once(fake: FakeSlack, thread_ts: str, question: str) -> float:
    """Until the thread holds the whole answer; then checks it is the only bot message. Returns when."""
    fake.wait_for(
        lambda: any(LAST_WORDS in m.get("text", "") and m.get("stream_state") != "streaming"
                    for m in bot_messages(fake, thread_ts)),
        timeout=90, description="the whole answer",
    )
    answered_at = time.monotonic()
    time.sleep(1.5)  # a second answer or a leftover would show by now
    messages = bot_messages(fake, thread_ts)
    assert len(messages) == 1, [m.get("text") for m in messages]
    assert question in messages[0]["text"] and LAST_WORDS in messages[0]["text"]
    assert messages[0].get("stream_state") != "streaming"
    return answered_at


def stop(process: subprocess.Popen[bytes], log: Path, how: signal.Signals = signal.SIGTERM) -> str:
    process.send_signal(how)
    try:
        exit_code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    output = log.read_text(errors="replace")
    if how == signal.SIGTERM:
        assert exit_code == 0, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    return output


def stored_rows(database: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(database) as connection:
        return connection.execute("select role, status from messages order by id").fetchall()


def test_sigterm_mid_answer_then_a_restart_within_5_s_answers_in_place(tmp_path: Path, tiny_checkpoint):
    database = tmp_path / "finbot.db"
    with FakeSlack() as fake:
        settings = finbot_settings(fake, f"sqlite:///{database}", tiny_checkpoint)
        first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
        first = start_finbot("run", cwd=tmp_path, log_path=first_log, **settings)
        try:
            fake.wait_connected(timeout=60)
            mention = fake.mention_event("재시작 중 질문", channel="C1")
            fake.send_event(mention)
            wait_streaming(fake, mention["ts"])
        finally:
            output = stop(first, first_log)
        assert "released for the next instance" in output
        # The interrupted message is closed (no endless "typing") and tells the user what happens.
        [left] = bot_messages(fake, mention["ts"])
        assert left.get("stream_state") != "streaming" and left["text"] == messages_ko.ANSWER_RESUMING

        restarted_at = time.monotonic()
        second = start_finbot("run", cwd=tmp_path, log_path=second_log, **settings)
        try:
            answered_at = wait_answered_once(fake, mention["ts"], "재시작 중 질문")
        finally:
            stop(second, second_log)
    # Seconds, not minutes: the released question was taken at the restart's first sweep.
    assert answered_at - restarted_at < 45
    assert stored_rows(database) == [("user", "answered"), ("assistant", "answered")]


def test_kill_9_mid_answer_then_a_restart_replaces_the_half_answer(tmp_path: Path, tiny_checkpoint):
    database = tmp_path / "finbot.db"
    with FakeSlack() as fake:
        # A lease far longer than the test: only the restart's "its process is gone" check can help.
        settings = finbot_settings(fake, f"sqlite:///{database}", tiny_checkpoint, QUESTION_LEASE_S="600")
        first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
        first = start_finbot("run", cwd=tmp_path, log_path=first_log, **settings)
        try:
            fake.wait_connected(timeout=60)
            mention = fake.mention_event("강제 종료 중 질문", channel="C1")
            fake.send_event(mention)
            wait_streaming(fake, mention["ts"])
        finally:
            stop(first, first_log, signal.SIGKILL)
        assert stored_rows(database)[0] == ("user", "generating")

        second = start_finbot("run", cwd=tmp_path, log_path=second_log, **settings)
        try:
            wait_answered_once(fake, mention["ts"], "강제 종료 중 질문")
        finally:
            output = stop(second, second_log)
        assert "its instance is gone" in output
    assert stored_rows(database) == [("user", "answered"), ("assistant", "answered")]


def test_kill_9_with_a_second_instance_running_is_taken_over_without_a_restart(
    tmp_path: Path, tiny_checkpoint, postgres_server
):
    database_url = postgres_server.create_database()
    with FakeSlack() as fake:
        settings = finbot_settings(fake, database_url, tiny_checkpoint)
        survivor_log, victim_log = tmp_path / "survivor.log", tmp_path / "victim.log"
        survivor = start_finbot("run", cwd=tmp_path, log_path=survivor_log, **settings)
        victim: subprocess.Popen[bytes] | None = None
        try:
            fake.wait_connected(timeout=60)
            # The fake delivers events to the newest connection: the victim's.
            victim = start_finbot("run", cwd=tmp_path, log_path=victim_log, **settings)
            fake.wait_connected(timeout=60, count=2)
            mention = fake.mention_event("인스턴스가 죽은 질문", channel="C1")
            fake.send_event(mention)
            wait_streaming(fake, mention["ts"])
            stop(victim, victim_log, signal.SIGKILL)
            killed_at = time.monotonic()
            answered_at = wait_answered_once(fake, mention["ts"], "인스턴스가 죽은 질문")
            # A follow-up in the same thread is answered by the survivor, after the recovered answer.
            follow_up = fake.message_event("그럼 다음 질문", channel="C1", thread_ts=mention["ts"])
            fake.send_event(follow_up)
            fake.wait_for(lambda: len(bot_messages(fake, mention["ts"])) == 2, timeout=60,
                          description="the follow-up's answer")
        finally:
            if victim is not None and victim.poll() is None:
                victim.kill()
            output = stop(survivor, survivor_log)
    assert "taken over" in output
    assert answered_at - killed_at < 30  # within the 6 s lease and its sweeps, not minutes
    postgres_server.drop_database(database_url)


def test_term_of_day_owner_killed_between_claim_and_post_is_posted_once_by_the_next_run(
    tmp_path: Path, tiny_checkpoint
):
    database = tmp_path / "finbot.db"

    def claim_status() -> list[tuple[str, str | None]]:
        with sqlite3.connect(database) as connection:
            try:
                return connection.execute("select status, slack_ts from term_posts").fetchall()
            except sqlite3.OperationalError:  # not migrated yet
                return []

    with FakeSlack() as fake:
        settings = {
            **slack_settings(fake), "DATABASE_URL": f"sqlite:///{database}", "ENGINE": "fake",
            "BASE_MODEL": str(tiny_checkpoint.base_dir), "FAKE_REPLY": FAKE_REPLY, "FAKE_TOKENS_PER_SECOND": "8",
            "TERM_OF_DAY_CHANNELS": "C1", "TERM_OF_DAY_INCLUDE_WEEKENDS": "true",
            "TERM_OF_DAY_INCLUDE_HOLIDAYS": "true",
        }
        killed_log = tmp_path / "killed.log"
        killed = start_finbot("term", "today", cwd=tmp_path, log_path=killed_log, **settings)
        try:
            fake.wait_for(lambda: claim_status() == [("claimed", None)], timeout=60,
                          description="the day claimed, its explanation generating")
        finally:
            stop(killed, killed_log, signal.SIGKILL)
        assert fake.messages(channel="C1") == []

        rerun = run_finbot("term", "today", cwd=tmp_path, timeout=120, **settings)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert ": posted " in rerun.stdout, rerun.stdout + rerun.stderr[-3000:]
        posts = [m for m in fake.messages(channel="C1") if m.get("thread_ts") is None]
        assert len(posts) == 1
        assert claim_status() == [("posted", posts[0]["ts"])]


def test_sigterm_right_after_commands_still_acknowledges_every_command_it_took_in(tmp_path: Path, tiny_checkpoint):
    """A slash command whose listener is running when SIGTERM arrives still gets its ack (Slack shows
    the user a timeout otherwise); the connection closes after that, and the log has no traceback."""
    with FakeSlack() as fake:
        settings = finbot_settings(fake, f"sqlite:///{tmp_path / 'finbot.db'}", tiny_checkpoint,
                                   SLASH_COMMAND="/용어")
        log = tmp_path / "finbot.log"
        process = start_finbot("run", cwd=tmp_path, log_path=log, **settings)
        try:
            fake.wait_connected(timeout=60)
            envelopes = [fake.send_slash_command({"command": "/용어", "text": "도움말", "channel_id": "C7"})
                         for _ in range(8)]
            # SIGTERM as soon as the first answer is out: its listener is about to ack, others run.
            fake.wait_for(lambda: fake.responses or None, timeout=30, description="a /용어 response")
        finally:
            stop(process, log)
        answered = {r["response_url_id"] for r in fake.responses}
        assert answered, "no command answered"
        assert all(fake.acked(envelope) for envelope in envelopes if envelope in answered), [
            (envelope, fake.acked(envelope)) for envelope in envelopes]
