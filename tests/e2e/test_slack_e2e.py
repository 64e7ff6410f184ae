"""The real `finbot run` process, connected in Socket Mode to the local fake Slack server."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot import messages_ko
from tests.e2e.process import running_finbot
from tests.fakes.slack_server import FakeSlack

pytestmark = pytest.mark.e2e

# The fake engine fills this from the prompt it receives. It also carries what the model must
# never get through to Slack: a channel-wide ping, prompt tags, Markdown, a cut-off sentence.
FAKE_REPLY = (
    "**요약**: {question} 질문에 답해요. 이전 대화는 {history_turns}개예요. "
    "<!channel> <@U999> 확인하세요.</s> 그리고 이어서"
)


@dataclass
class RunningBot:
    fake: FakeSlack
    database: Path
    log: Path

    def answers(self, channel: str, thread_ts: str) -> list[dict]:
        return [
            message
            for message in self.fake.messages(channel=channel, thread_ts=thread_ts)
            if message.get("user") == self.fake.bot_user_id or message.get("bot_id")
        ]

    def wait_for_answer(self, channel: str, thread_ts: str, count: int = 1) -> list[dict]:
        def finished() -> list[dict] | None:
            answers = self.answers(channel, thread_ts)
            # A finished answer carries the 👍/👎 buttons; the placeholder and streamed views do not.
            done = [a for a in answers if a.get("blocks")]
            return done if len(done) >= count else None

        return self.fake.wait_for(finished, timeout=30, description=f"{count} answer(s) in {channel}/{thread_ts}")

    def rows(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.database) as connection:
            return connection.execute(sql).fetchall()


@pytest.fixture
def running_bot(tmp_path: Path, tiny_checkpoint) -> Iterator[RunningBot]:
    database = tmp_path / "finbot.db"
    log = tmp_path / "finbot.log"
    with (
        FakeSlack() as fake,
        running_finbot(
            fake,
            tmp_path,
            log,
            DATABASE_URL=f"sqlite:///{database}",
            ENGINE="fake",
            BASE_MODEL=str(tiny_checkpoint.base_dir),
            FAKE_REPLY=FAKE_REPLY,
        ),
    ):
        yield RunningBot(fake=fake, database=database, log=log)


def test_mention_follow_up_retry_and_dm(running_bot: RunningBot):
    fake = running_bot.fake
    mention = fake.mention_event(f"<@{fake.bot_user_id}> 중앙은행의 역할에 대해서 설명해줄래?", channel="C1")
    envelope = fake.send_event(mention, event_id="EvMention1")
    fake.wait_acked(envelope)  # raises unless Bolt acknowledged the envelope
    thread = mention["ts"]

    [answer] = running_bot.wait_for_answer("C1", thread)
    # The answer started at once, so it was streamed without a "thinking" placeholder first
    # (one is posted only when no text appears within PLACEHOLDER_DELAY_S).
    assert messages_ko.THINKING not in [c.params.get("text") for c in fake.calls_to("chat.postMessage")]
    [start] = [c for c in fake.calls_to("chat.startStream") if c.params.get("thread_ts") == thread]
    assert answer["ts"] == start.response["ts"]
    assert fake.calls_to("chat.stopStream")
    text = answer["text"]
    assert "중앙은행의 역할에 대해서 설명해줄래? 질문에 답해요" in text
    assert "이전 대화는 0개예요" in text
    assert text.startswith("*요약*")  # Markdown bold became Slack bold
    assert "<!channel>" not in text and "<@U999>" not in text and "&lt;!channel&gt;" in text
    assert "</s>" not in text and "그리고 이어서" not in text  # tags gone, cut-off tail trimmed

    # Slack redelivers the same event: no second answer.
    retry = fake.send_event(mention, event_id="EvMention1", retry_attempt=1, retry_reason="timeout")
    fake.wait_acked(retry)

    # A follow-up in the thread, without a mention, is answered with the earlier turn as history.
    follow_up = fake.message_event("그럼 기준금리는?", channel="C1", thread_ts=thread)
    fake.send_event(follow_up, event_id="EvFollowUp1")
    answers = running_bot.wait_for_answer("C1", thread, count=2)
    assert "그럼 기준금리는? 질문에 답해요" in answers[-1]["text"]
    assert "이전 대화는 1개예요" in answers[-1]["text"]

    # DMs work the same way.
    dm = fake.message_event("환율이 뭐야?", channel="D1", channel_type="im")
    fake.send_event(dm, event_id="EvDm1")
    [dm_answer] = running_bot.wait_for_answer("D1", dm["ts"])
    assert "환율이 뭐야? 질문에 답해요" in dm_answer["text"]

    # A thread finbot was never part of is not its business.
    stranger = fake.message_event("이건 다른 이야기", channel="C1", thread_ts=fake.next_ts())
    fake.wait_acked(fake.send_event(stranger, event_id="EvStranger"))

    time.sleep(1.0)  # give a wrongly handled retry or stranger message the time to show up
    assert len(running_bot.answers("C1", thread)) == 2
    assert running_bot.answers("C1", stranger["thread_ts"]) == []

    messages = running_bot.rows(
        "select c.channel_id, c.thread_ts, m.role, m.status, m.text from messages m "
        "join conversations c on c.id = m.conversation_id order by m.id"
    )
    assert [(channel, role, status) for channel, _, role, status, _ in messages] == [
        ("C1", "user", "answered"),
        ("C1", "assistant", "answered"),
        ("C1", "user", "answered"),
        ("C1", "assistant", "answered"),
        ("D1", "user", "answered"),
        ("D1", "assistant", "answered"),
    ]
    assert messages[0][4] == "중앙은행의 역할에 대해서 설명해줄래?"  # stored without the bot mention
    # The stored answer is the cleaned text, not Slack's escaped form.
    assert "<!channel>" in messages[1][4]
    assert {row[0] for row in running_bot.rows("select event_id from processed_events")} >= {
        "EvMention1", "EvFollowUp1", "EvDm1",
    }


def test_empty_mention_gets_a_usage_hint_and_nothing_is_generated(running_bot: RunningBot):
    fake = running_bot.fake
    mention = fake.mention_event(f"<@{fake.bot_user_id}>   ", channel="C2")
    fake.send_event(mention, event_id="EvEmpty")
    reply = fake.wait_for_message(channel="C2", thread_ts=mention["ts"], timeout=30)
    assert reply["text"] == messages_ko.EMPTY_QUESTION
    assert running_bot.rows("select count(*) from messages") == [(0,)]
