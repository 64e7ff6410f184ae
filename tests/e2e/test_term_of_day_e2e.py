"""오늘의 금융용어 through real processes: `finbot term today` posts, `finbot run` answers in its thread."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.e2e.process import run_finbot, running_finbot, slack_settings
from tests.fakes.slack_server import FakeSlack

pytestmark = pytest.mark.e2e

FAKE_REPLY = "{question} 질문에 답해요. 이전 대화는 {history_turns}개예요."


def test_term_today_posts_once_and_a_thread_follow_up_carries_the_term_as_history(tmp_path: Path, tiny_checkpoint):
    database = tmp_path / "finbot.db"
    with FakeSlack() as fake:
        settings = dict(
            **slack_settings(fake),
            DATABASE_URL=f"sqlite:///{database}",
            ENGINE="fake",
            BASE_MODEL=str(tiny_checkpoint.base_dir),
            FAKE_REPLY=FAKE_REPLY,
            SLASH_COMMAND="/용어",
            TERM_OF_DAY_CHANNELS="C1",
            # Whatever day the test runs on, it is a posting day.
            TERM_OF_DAY_INCLUDE_WEEKENDS="true",
            TERM_OF_DAY_INCLUDE_HOLIDAYS="true",
        )
        first = run_finbot("term", "today", cwd=tmp_path, **settings)
        assert first.returncode == 0, first.stderr
        assert ": posted " in first.stdout
        # A second run the same day (another operator, a retry) finds the claim and posts nothing.
        second = run_finbot("term", "today", cwd=tmp_path, **settings)
        assert second.returncode == 0, second.stderr
        assert ": skipped " in second.stdout

        [post] = [m for m in fake.messages(channel="C1") if m.get("thread_ts") is None]
        [(term, status, slack_ts)] = sqlite3.connect(database).execute(
            "select term, status, slack_ts from term_posts"
        ).fetchall()
        assert (status, slack_ts) == ("posted", post["ts"])
        assert term in post["blocks"][0]["text"]["text"]
        assert "뜻을 먼저 한두 문장으로 정의하고" in post["blocks"][1]["text"]["text"]

        history = run_finbot("term", "history", cwd=tmp_path, **settings)
        assert history.returncode == 0 and term in history.stdout and "posted" in history.stdout

        log = tmp_path / "finbot.log"
        with running_finbot(fake, tmp_path, log, **settings):
            follow_up = fake.message_event("예시를 하나 더 들어줘", channel="C1", thread_ts=post["ts"])
            fake.send_event(follow_up, event_id="EvTermFollowUp")
            answer = fake.wait_for_message(
                channel="C1",
                thread_ts=post["ts"],
                match=lambda m: "질문에 답해요" in (m.get("text") or ""),
                timeout=30,
            )
            # The thread's first turn (the term and its explanation) reached the model as history.
            assert "예시를 하나 더 들어줘 질문에 답해요" in answer["text"]
            assert "이전 대화는 1개예요" in answer["text"]

            # `/용어 오늘` shows today's post to whoever missed it, only to them.
            envelope = fake.send_slash_command({"command": "/용어", "text": "오늘", "channel_id": "C7"})
            [response] = fake.wait_for(
                lambda: [r["body"] for r in fake.responses if r["response_url_id"] == envelope] or None,
                timeout=30,
                description="the /용어 오늘 response",
            )
            assert response["response_type"] == "ephemeral"
            assert response["blocks"] == post["blocks"]
        output = log.read_text(errors="replace")
        assert "scheduler started" in output
        # The startup catch-up of `finbot run` may fall inside today's window; it must not post again.
        assert len([m for m in fake.messages(channel="C1") if m.get("thread_ts") is None]) == 1
