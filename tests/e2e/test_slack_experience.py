"""Streaming, fallback, back-off, splitting, assistant pane, /용어, Q&A channels, feedback, rate limits.

One real `finbot run` process (fake engine, slowed down so streaming is observable) serves the
whole module; each test uses its own channels and users so they do not interfere.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot import messages_ko
from bot.listeners.slash import REGENERATE_ACTION
from bot.replies import FEEDBACK_DOWN_ACTION, FEEDBACK_UP_ACTION
from bot.streaming import STREAMING_CURSOR
from tests.e2e.process import run_finbot, running_finbot, slack_settings
from tests.fakes.slack_server import ApiCall, FakeSlack

pytestmark = pytest.mark.e2e

FAKE_REPLY = "{question} 질문에 답해요. 첫째 문장입니다. 둘째 문장입니다. <!here> 셋째 문장입니다. 마지막 문장이에요."


@dataclass
class Bot:
    fake: FakeSlack
    database: Path
    log: Path
    settings: dict[str, str]

    def rows(self, sql: str, *args: object) -> list[tuple]:
        with sqlite3.connect(self.database) as connection:
            return connection.execute(sql, args).fetchall()

    def bot_messages(self, channel: str, thread_ts: str) -> list[dict]:
        return [m for m in self.fake.messages(channel=channel, thread_ts=thread_ts) if m.get("bot_id")]

    def wait_answers(self, channel: str, thread_ts: str, count: int = 1) -> list[dict]:
        def done() -> list[dict] | None:
            finished = [m for m in self.bot_messages(channel, thread_ts) if m.get("blocks")]
            return finished if len(finished) >= count else None

        return self.fake.wait_for(done, timeout=20, description=f"{count} answer(s) in {channel}/{thread_ts}")

    def ask(self, text: str, channel: str, user: str | None = None) -> str:
        # One user per channel by default, so the per-user rate limit of one test never hits another.
        event = self.fake.mention_event(text, channel=channel, user=user or f"U{channel}")
        self.fake.send_event(event)
        return event["ts"]


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint) -> Iterator[Bot]:
    tmp_path = tmp_path_factory.mktemp("experience")
    database = tmp_path / "finbot.db"
    log = tmp_path / "finbot.log"
    with FakeSlack() as fake:
        settings = dict(
            **slack_settings(fake),
            DATABASE_URL=f"sqlite:///{database}",
            ENGINE="fake",
            BASE_MODEL=str(tiny_checkpoint.base_dir),
            FAKE_REPLY=FAKE_REPLY,
            FAKE_TOKENS_PER_SECOND="40",
            STREAM_FLUSH_SECONDS="0.1",
            SLACK_MESSAGE_MAX_CHARS="300",
            SLASH_COMMAND="/용어",
            QA_CHANNELS="CQA",
            RATE_LIMIT_PER_USER="3",
            RATE_LIMIT_WINDOW_S="600",
        )
        with running_finbot(fake, tmp_path, log, **settings):
            yield Bot(fake=fake, database=database, log=log, settings=settings)


def _chunk_text(call: ApiCall) -> str:
    return "".join(c.get("text", "") for c in call.params.get("chunks") or [] if isinstance(c, dict))


def _stream_calls(fake: FakeSlack, channel: str) -> list[ApiCall]:
    return [
        c
        for c in fake.calls
        if c.method in ("chat.startStream", "chat.appendStream", "chat.stopStream") and c.params.get("channel") == channel
    ]


def test_native_streaming_shows_text_while_generating(bot: Bot):
    fake = bot.fake
    thread = bot.ask("기준금리가 뭐야?", channel="CS1")
    [answer] = bot.wait_answers("CS1", thread)
    calls = _stream_calls(fake, "CS1")
    assert [c.method for c in calls][0] == "chat.startStream"
    assert [c.method for c in calls][-1] == "chat.stopStream"
    assert sum(c.method == "chat.appendStream" for c in calls) >= 2  # text arrived in several batches
    start = calls[0]
    assert start.params["thread_ts"] == thread
    assert start.params["recipient_user_id"] == "UCS1" and start.params["recipient_team_id"] == fake.team_id
    streamed = "".join(_chunk_text(c) for c in calls)
    assert "&lt;!here&gt;" in streamed and "<!here>" not in streamed  # escaped while streaming too
    assert streamed.rstrip().endswith("마지막 문장이에요.")  # the tail made it
    # The streamed message becomes the final, cleaned answer with feedback buttons.
    assert answer["ts"] == start.response["ts"]
    assert answer["text"].startswith("기준금리가 뭐야? 질문에 답해요.")
    assert "&lt;!here&gt;" in answer["text"]
    actions = [b for b in answer["blocks"] if b["type"] == "actions"][0]
    assert {e["action_id"] for e in actions["elements"]} == {FEEDBACK_UP_ACTION, FEEDBACK_DOWN_ACTION}
    # The placeholder was replaced, and the question remembers its reply message.
    assert [m["ts"] for m in bot.bot_messages("CS1", thread)] == [answer["ts"]]
    # The answer is stored right after its final update reaches Slack.
    fake.wait_for(
        lambda: bot.rows("select reply_ts, status from messages where slack_ts = ?", thread)
        == [(answer["ts"], "answered")],
        description="question stored as answered with its reply ts",
    )


def test_rate_limited_stream_backs_off_and_keeps_the_tail(bot: Bot):
    fake = bot.fake
    fake.fail_next("chat.appendStream", retry_after=1)
    fake.fail_next("chat.stopStream", retry_after=1)
    thread = bot.ask("환율이 뭐야?", channel="CS2")
    [answer] = bot.wait_answers("CS2", thread)
    calls = _stream_calls(fake, "CS2")
    limited = [c for c in calls if c.status == 429]
    assert {c.method for c in limited} == {"chat.appendStream", "chat.stopStream"}
    ok = [c for c in calls if c.status == 200]
    # Nothing was sent to the stream before Retry-After had passed.
    for refused in limited:
        after = [c for c in ok if c.at > refused.at and c.method != "chat.startStream"]
        assert after and after[0].at - refused.at >= 0.9
    streamed = "".join(_chunk_text(c) for c in ok)
    assert streamed.startswith("환율이 뭐야? 질문에 답해요.")
    assert streamed.rstrip().endswith("마지막 문장이에요.")
    assert answer["text"].endswith("마지막 문장이에요.")


def test_refused_streaming_falls_back_to_chat_update_per_workspace(bot: Bot):
    fake = bot.fake

    def refuse_for_t2(call: ApiCall) -> dict | None:
        return {"ok": False, "error": "feature_not_enabled"} if call.params.get("recipient_team_id") == "T2" else None

    fake.set_response_override("chat.startStream", refuse_for_t2)
    try:
        threads = []
        for question in ("물가가 뭐야?", "채권이 뭐야?"):
            fake.team_id = "T2"
            try:
                threads.append(bot.ask(question, channel="CF1"))
            finally:
                fake.team_id = "T0001"
            [answer] = bot.wait_answers("CF1", threads[-1])
            assert answer["text"].startswith(f"{question} 질문에 답해요.")
            assert answer["text"].endswith("마지막 문장이에요.")
            # The answer started at once (no "thinking" placeholder first): the first progress view
            # posted became the answer, edited in place.
            [posted] = [c for c in fake.calls_to("chat.postMessage") if c.params.get("thread_ts") == threads[-1]]
            shown = posted.params["text"]
            assert shown != messages_ko.THINKING and shown.endswith(STREAMING_CURSOR)
            assert question.startswith(shown.removesuffix(STREAMING_CURSOR).strip())
            assert answer["ts"] == posted.response["ts"]
        starts = [c for c in fake.calls_to("chat.startStream") if c.params.get("channel") == "CF1"]
        assert len(starts) == 1  # refused once, remembered for the workspace
        updates = [c for c in fake.calls_to("chat.update") if c.params.get("channel") == "CF1"]
        assert len(updates) >= 4  # progress edits and final edits for both answers
        # Another workspace still streams natively.
        thread = bot.ask("주식이 뭐야?", channel="CF2")
        bot.wait_answers("CF2", thread)
        assert [c for c in fake.calls_to("chat.startStream") if c.params.get("channel") == "CF2"]
    finally:
        fake.set_response_override("chat.startStream", None)


def test_long_answer_is_split_at_sentence_boundaries(bot: Bot):
    sentences = [f"{n}번째로 금리와 환율과 물가의 관계를 알려줘." for n in range(1, 13)]
    long_question = " ".join(sentences)
    thread = bot.ask(long_question, channel="CL1")
    answers = bot.wait_answers("CL1", thread)
    messages = bot.bot_messages("CL1", thread)
    assert len(messages) >= 2 and messages[-1]["ts"] == answers[-1]["ts"], [(m["text"], m.get("blocks")) for m in messages]
    assert all(len(m["text"]) <= 300 for m in messages)
    assert all(m["text"].rstrip().endswith((".", "요.")) for m in messages)  # whole sentences
    joined = " ".join(m["text"] for m in messages)
    assert all(sentence in joined for sentence in sentences)
    assert joined.endswith("마지막 문장이에요.")
    assert [bool(m.get("blocks")) for m in messages] == [False] * (len(messages) - 1) + [True]


def test_assistant_pane(bot: Bot):
    fake = bot.fake
    thread_ts = fake.next_ts()
    started = {
        "type": "assistant_thread_started",
        "assistant_thread": {"user_id": "UAS", "context": {}, "channel_id": "DAS", "thread_ts": thread_ts},
        "event_ts": thread_ts,
    }
    fake.send_event(started)
    prompts = fake.wait_for(lambda: fake.calls_to("assistant.threads.setSuggestedPrompts"), timeout=10)
    messages = [p["message"] for p in prompts[0].params["prompts"]]
    assert "기준금리가 뭐야?" in messages and "오늘의 금융용어 알려줘" in messages

    question = fake.message_event("인플레이션과 디플레이션의 차이는?", user="UAS", channel="DAS",
                                  channel_type="im", thread_ts=thread_ts)
    fake.send_event(question, event_id="EvAssistant1")
    [answer] = bot.wait_answers("DAS", thread_ts)
    assert answer["text"].startswith("인플레이션과 디플레이션의 차이는? 질문에 답해요.")
    [title] = fake.calls_to("assistant.threads.setTitle")
    assert title.params["title"] == "인플레이션과 디플레이션의 차이는?"
    statuses = [c.params["status"] for c in fake.calls_to("assistant.threads.setStatus")]
    assert messages_ko.ASSISTANT_STATUS in statuses
    # A status instead of a placeholder message in the pane.
    assert messages_ko.THINKING not in [c.params.get("text") for c in fake.calls_to("chat.postMessage")
                                         if c.params.get("channel") == "DAS"]

    # Slack redelivers the event: no second answer, and no status that no answer would clear.
    replies = bot.bot_messages("DAS", thread_ts)  # the greeting and the answer
    fake.wait_acked(fake.send_event(question, event_id="EvAssistant1", retry_attempt=1, retry_reason="timeout"))
    time.sleep(1.0)  # give a wrongly handled retry the time to show up
    assert bot.bot_messages("DAS", thread_ts) == replies
    assert len(fake.calls_to("assistant.threads.setStatus")) == len(statuses)


def _responses(fake: FakeSlack, envelope: str) -> list[dict]:
    return [r["body"] for r in fake.responses if r["response_url_id"] == envelope]


def test_slash_command_lookup_cache_and_regenerate(bot: Bot):
    fake = bot.fake
    usage = fake.send_slash_command({"command": "/용어", "text": "", "channel_id": "CT1"})
    [body] = fake.wait_for(lambda: _responses(fake, usage), timeout=10)
    assert body["text"] == messages_ko.TERM_USAGE.format(command="/용어")
    assert body["response_type"] == "ephemeral"
    assert bot.rows("select count(*) from term_lookups") == [(0,)]

    first = fake.send_slash_command({"command": "/용어", "text": "환율", "channel_id": "CT1"})
    answered = fake.wait_for(lambda: [b for b in _responses(fake, first) if b.get("blocks")], timeout=10)
    looking = [b for b in _responses(fake, first) if not b.get("blocks")]
    assert looking[0]["text"] == messages_ko.TERM_LOOKING_UP.format(term="환율")
    answer = answered[0]
    assert answer["response_type"] == "in_channel"
    assert answer["text"].startswith("*환율*\n")
    assert "금융 용어 '환율'의 뜻을 설명해 주세요" in answer["text"]  # the dedicated instruction reached the engine
    [(key, created)] = bot.rows("select term_key, created_at from term_lookups")
    assert key == "환율"

    # Same term again (spaced differently): the stored answer, no generation.
    second = fake.send_slash_command({"command": "/용어", "text": " 환 율 ", "channel_id": "CT1"})
    [cached] = fake.wait_for(lambda: _responses(fake, second), timeout=10)
    assert cached["text"] == answer["text"]
    assert any(b["type"] == "context" for b in cached["blocks"])  # "저장된 설명이에요"
    assert bot.rows("select created_at from term_lookups") == [(created,)]

    # ↻ regenerates and replaces the message.
    button = [b for b in cached["blocks"] if b["type"] == "actions"][0]["elements"][0]
    assert button["action_id"] == REGENERATE_ACTION
    click = fake.send_interactive(
        {"actions": [{"action_id": REGENERATE_ACTION, "block_id": "finbot_term", "type": "button",
                      "value": button["value"], "action_ts": fake.next_ts()}],
         "channel": {"id": "CT1", "name": "general"}, "container": {"type": "message", "channel_id": "CT1"}}
    )
    [regenerated] = fake.wait_for(lambda: _responses(fake, click), timeout=10)
    assert regenerated["replace_original"] is True and regenerated["text"] == answer["text"]
    fake.wait_for(lambda: bot.rows("select created_at from term_lookups") != [(created,)], timeout=5)


def test_qa_channels_answer_top_level_questions_only(bot: Bot):
    fake = bot.fake
    configured = fake.message_event("예금자보호 한도는 얼마야?", channel="CQA", user="UQ1")
    fake.send_event(configured)
    [answer] = bot.wait_answers("CQA", configured["ts"])
    assert answer["text"].startswith("예금자보호 한도는 얼마야? 질문에 답해요.")

    # Joined with the slash command.
    join = fake.send_slash_command({"command": "/용어", "text": "질문채널 켜기", "channel_id": "CQB", "user_id": "UQ2"})
    [body] = fake.wait_for(lambda: _responses(fake, join), timeout=10)
    assert body["text"] == messages_ko.QA_CHANNEL_ON
    asked = fake.message_event("ETF가 뭐야?", channel="CQB", user="UQ2")
    fake.send_event(asked)
    bot.wait_answers("CQB", asked["ts"])

    ignored = [
        fake.message_event("", channel="CQA", subtype="channel_join"),
        fake.message_event("봇의 알림입니다", channel="CQA", bot_id="BOTHER", subtype="bot_message"),
        fake.message_event("", channel="CQA", subtype="file_share", files=[{"id": "F1"}]),
        fake.message_event("", channel="CQA", subtype="message_changed",
                           message={"text": "수정됨", "ts": configured["ts"]}),
        fake.message_event("", channel="CQA", subtype="message_deleted", deleted_ts=configured["ts"]),
        fake.message_event("일반 채널의 질문이야?", channel="CQZ"),
    ]
    for event in ignored:
        fake.wait_acked(fake.send_event(event))
    time.sleep(1.0)
    for event in ignored:
        assert bot.bot_messages(event["channel"], event["ts"]) == []
    assert len(bot.bot_messages("CQA", configured["ts"])) == 1


def test_feedback_votes_are_stored_and_exported(bot: Bot, tmp_path: Path):
    fake = bot.fake
    thread = bot.ask("국채가 뭐야?", channel="CFB", user="UFB")
    [answer] = bot.wait_answers("CFB", thread)
    up = [b for b in answer["blocks"] if b["type"] == "actions"][0]["elements"][0]

    def click(action_id: str) -> None:
        fake.send_interactive(
            {"actions": [{"action_id": action_id, "block_id": "finbot_feedback", "type": "button",
                          "value": up["value"], "action_ts": fake.next_ts()}],
             "user": {"id": "UVOTER", "username": "voter", "name": "voter", "team_id": fake.team_id},
             "channel": {"id": "CFB", "name": "general"},
             "container": {"type": "message", "channel_id": "CFB", "message_ts": answer["ts"], "thread_ts": thread},
             "message": answer}
        )

    click(FEEDBACK_UP_ACTION)
    fake.wait_for(lambda: bot.rows("select slack_user, vote from feedback") == [("UVOTER", 1)], timeout=10)
    click(FEEDBACK_DOWN_ACTION)  # a second click changes the vote
    fake.wait_for(lambda: bot.rows("select slack_user, vote from feedback") == [("UVOTER", -1)], timeout=10)
    thanks = fake.wait_for(lambda: fake.ephemerals(channel="CFB", user="UVOTER"), timeout=5)
    assert thanks[0]["text"] == messages_ko.FEEDBACK_THANKS_UP

    out = tmp_path / "feedback.jsonl"
    result = run_finbot("feedback", "export", "--output", str(out), cwd=tmp_path,
                        DATABASE_URL=bot.settings["DATABASE_URL"], timeout=60)
    assert result.returncode == 0, result.stderr
    [row] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row["vote"] == -1 and row["user"] == "UVOTER" and row["question"] == "국채가 뭐야?"
    assert row["answer"].startswith("국채가 뭐야? 질문에 답해요.") and row["channel_id"] == "CFB"


def test_per_user_rate_limit_gets_a_polite_reply(bot: Bot):
    # One after the other: Bolt runs listeners concurrently, so a burst would be limited in any order.
    threads = []
    for n in range(4):
        threads.append(bot.ask(f"질문 {n}번이야?", channel="CRL", user="URL"))
        if n < 3:
            bot.wait_answers("CRL", threads[-1])
    reply = bot.fake.wait_for_message(channel="CRL", thread_ts=threads[3], timeout=10)
    assert reply["text"] == messages_ko.RATE_LIMITED_USER
    assert bot.rows("select count(*) from messages where slack_ts = ?", threads[3]) == [(0,)]
    # Another user in the same channel is still answered.
    other = bot.ask("다른 사람 질문이야?", channel="CRL", user="UOK")
    bot.wait_answers("CRL", other)
