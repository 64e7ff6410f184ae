"""A corpus of hostile and odd inputs (tests/e2e/hostile_corpus.json) run through the real `finbot run`.

Every item gets a sensible reply or is ignored by design, nothing crashes, and nothing the bot
posts can ping anyone: the fake engine echoes the question back, so a `<!channel>` in a question
would reach Slack unless the output is escaped.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from bot import messages_ko
from tests.e2e.process import running_finbot
from tests.fakes.slack_server import FakeSlack

pytestmark = pytest.mark.e2e

CORPUS = json.loads((Path(__file__).parent / "hostile_corpus.json").read_text(encoding="utf-8"))
# Slack turns these into notifications: channel-wide pings, user/group mentions.
PING = re.compile(r"<\s*(!channel|!here|!everyone|!subteam|@[UW])", re.IGNORECASE)
TEXT_PARAMS = ("text", "markdown_text")


def _text_of(item: dict[str, Any]) -> str:
    text = item["text"]
    if text == "@@LONG40000@@":
        return ("금리와 환율의 관계를 설명해 주세요. " * 2000)[:40000]
    if text == "@@LONG3000@@":
        return "채권 " * 1000
    return text


def _event(fake: FakeSlack, index: int, item: dict[str, Any], seen_thread: str) -> tuple[dict, str, str]:
    """The Slack event for an item, the channel and the thread its reply (if any) belongs in."""
    kind, text = item["kind"], _text_of(item)
    user = f"UH{index:03d}"
    channel = f"CH{index:03d}"
    ts = fake.next_ts()
    if kind == "mention":
        event = fake.mention_event(f"<@{fake.bot_user_id}> {text}", user=user, channel=channel, ts=ts)
        return event, channel, ts
    if kind == "mention_raw":
        return fake.mention_event(text, user=user, channel=channel, ts=ts), channel, ts
    if kind == "dm":
        return fake.message_event(text, user=user, channel=f"DH{index:03d}", ts=ts, channel_type="im"), f"DH{index:03d}", ts
    if kind == "dm_file":
        event = fake.message_event("", user=user, channel=f"DH{index:03d}", ts=ts, channel_type="im",
                                   subtype="file_share", files=[{"id": "F1", "name": "report.pdf"}])
        return event, f"DH{index:03d}", ts
    if kind == "unknown_thread":
        thread = f"{int(time.time()) - 1000}.000100"
        return fake.message_event(text, user=user, channel=channel, ts=ts, thread_ts=thread), channel, thread
    if kind == "channel_message":
        return fake.message_event(text, user=user, channel=channel, ts=ts), channel, ts
    if kind == "bot_message":
        event = fake.message_event(text, user=user, channel="CSEEN", ts=ts, thread_ts=seen_thread,
                                   subtype="bot_message", bot_id="BOTHER")
        return event, "CSEEN", ts
    if kind == "bot_mention":
        event = fake.mention_event(text, user=user, channel=channel, ts=ts)
        event["bot_id"] = "BOTHER"
        return event, channel, ts
    if kind == "message_changed":
        event = {"type": "message", "subtype": "message_changed", "channel": "CSEEN", "ts": ts, "hidden": True,
                 "channel_type": "channel", "event_ts": ts,
                 "message": {"type": "message", "user": user, "text": text, "ts": seen_thread, "thread_ts": seen_thread},
                 "previous_message": {"type": "message", "user": user, "text": "원래 질문", "ts": seen_thread}}
        return event, "CSEEN", ts
    if kind == "message_deleted":
        event = {"type": "message", "subtype": "message_deleted", "channel": "CSEEN", "ts": ts, "hidden": True,
                 "deleted_ts": seen_thread, "channel_type": "channel", "event_ts": ts,
                 "previous_message": {"type": "message", "user": user, "text": "지운 질문", "ts": seen_thread}}
        return event, "CSEEN", ts
    if kind == "channel_join":
        return fake.message_event(text, user=user, channel=channel, ts=ts, subtype="channel_join"), channel, ts
    if kind == "channel_file":
        event = fake.message_event("", user=user, channel=channel, ts=ts, subtype="file_share",
                                   files=[{"id": "F2", "name": "a.png"}])
        return event, channel, ts
    if kind == "message_replied":
        event = {"type": "message", "subtype": "message_replied", "channel": "CSEEN", "ts": ts, "hidden": True,
                 "channel_type": "channel", "event_ts": ts, "message": {"type": "message", "ts": seen_thread}}
        return event, "CSEEN", ts
    raise ValueError(f"unknown corpus kind {kind!r}")


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 50
    assert len({item["name"] for item in CORPUS}) == len(CORPUS)


def test_hostile_corpus_end_to_end(tmp_path: Path, tiny_checkpoint):
    started = time.monotonic()
    log = tmp_path / "finbot.log"
    with (
        FakeSlack() as fake,
        running_finbot(
            fake, tmp_path, log,
            DATABASE_URL=f"sqlite:///{tmp_path / 'finbot.db'}", ENGINE="fake",
            BASE_MODEL=str(tiny_checkpoint.base_dir), FAKE_REPLY="받은 질문: {question}",
            GENERATION_WORKERS="8", MAX_PROMPT_TOKENS="3072", ENGINE_MAX_SEQ_LEN="4096",
        ) as process,
    ):
        # A thread finbot is part of, for the edits, deletions and other bots' posts to land in.
        seen = fake.mention_event(f"<@{fake.bot_user_id}> 기준 스레드", channel="CSEEN")
        fake.send_event(seen)
        fake.wait_for(lambda: fake.messages(channel="CSEEN", thread_ts=seen["ts"]), timeout=30,
                      description="answer in the seen thread")
        fake.wait_for(
            lambda: all(m.get("text") != messages_ko.THINKING
                        for m in fake.messages(channel="CSEEN", thread_ts=seen["ts"])),
            timeout=30, description="seen thread settled",
        )
        seen_count = len(fake.messages(channel="CSEEN", thread_ts=seen["ts"]))

        # The whole corpus at once, as a burst.
        placed: list[tuple[dict, str, str]] = []
        envelopes = []
        for index, item in enumerate(CORPUS):
            event, channel, thread = _event(fake, index, item, seen["ts"])
            envelopes.append(fake.send_event(event))
            placed.append((item, channel, thread))
        for envelope in envelopes:
            fake.wait_acked(envelope, timeout=20)

        def replies(channel: str, thread: str) -> list[dict]:
            return [m for m in fake.messages(channel=channel, thread_ts=thread) if m.get("bot_id") == fake.bot_id]

        def settled() -> bool:
            for item, channel, thread in placed:
                if item["expect"] != "reply":
                    continue
                got = replies(channel, thread)
                if not got or any(m.get("text") in ("", messages_ko.THINKING) for m in got):
                    return False
                if any(m.get("stream_state") == "streaming" for m in got):
                    return False
            return True

        fake.wait_for(settled, timeout=45, description="every corpus item answered")
        time.sleep(1.0)  # give wrongly handled ignored items the time to show up
        assert process.poll() is None, "finbot crashed:\n" + log.read_text(errors="replace")[-5000:]

        problems = []
        for item, channel, thread in placed:
            got = replies(channel, thread) if item["kind"] not in (
                "bot_message", "message_changed", "message_deleted", "message_replied") else []
            if item["expect"] == "reply" and len(got) != 1:
                problems.append(f"{item['name']}: {len(got)} replies")
            if item["expect"] == "ignore" and got:
                problems.append(f"{item['name']}: answered though it should be ignored: {got[0].get('text')!r}")
        if len(fake.messages(channel="CSEEN", thread_ts=seen["ts"])) != seen_count:
            problems.append("edits, deletions or other bots' messages were answered in the seen thread")
        assert problems == []

        # Nothing the bot sent can notify anyone.
        for call in fake.calls:
            texts = [call.params.get(key) for key in TEXT_PARAMS]
            texts += [chunk.get("text") for chunk in call.params.get("chunks") or [] if isinstance(chunk, dict)]
            for value in texts:
                if isinstance(value, str):
                    assert not PING.search(value), f"{call.method} pings: {value[:300]!r}"
        by_name = {item["name"]: (channel, thread) for item, channel, thread in placed}
        assert replies(*by_name["empty_mention"])[0]["text"] == messages_ko.EMPTY_QUESTION
        assert replies(*by_name["very_long_40000"])[0]["text"] == messages_ko.QUESTION_TOO_LONG
        echoed = replies(*by_name["channel_ping"])[0]["text"]
        assert "&lt;!channel&gt;" in echoed and "기준금리가 뭐야?" in echoed
    assert time.monotonic() - started < 60
