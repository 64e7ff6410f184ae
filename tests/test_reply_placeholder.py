"""The "thinking" placeholder: posted only when the answer does not start at once; the answer
ends in the streamed message itself (stopStream with the buttons) when nothing needs rewriting."""

from __future__ import annotations

from pathlib import Path

import pytest
from slack_sdk import WebClient

from bot import messages_ko
from bot.replies import PLACEHOLDER_DELAY_S, AnswerService, IncomingQuestion
from llm.engine import FakeEngine, SamplingParams
from storage.conversations import ConversationStore
from storage.db import create_db_engine, make_session_factory, upgrade_database
from tests.fakes.slack_server import FakeSlack


@pytest.fixture
def store(tmp_path: Path) -> ConversationStore:
    url = f"sqlite:///{tmp_path / 'finbot.db'}"
    upgrade_database(url)
    return ConversationStore(make_session_factory(create_db_engine(url)))


def _answer(store: ConversationStore, tokenizer, tokens_per_second: float, reply: str) -> FakeSlack:
    engine = FakeEngine(tokenizer, reply, tokens_per_second=tokens_per_second)
    service = AnswerService(store, engine, SamplingParams(), max_prompt_tokens=512, workers=1)
    with FakeSlack() as fake:
        client = WebClient(token=fake.bot_token, base_url=fake.api_url)
        thread = fake.next_ts()
        question = IncomingQuestion(fake.team_id, "C1", thread, thread, "U1", "기준금리가 뭐야?")
        future = service.submit(client, question, event_id="Ev1")
        assert future is not None
        future.result(timeout=30)
        # A redelivery of the same event is not answered again.
        assert service.submit(client, question, event_id="Ev1") is None
        service.shutdown()
    return fake


def test_slow_start_gets_a_placeholder_that_the_stream_replaces(store, mistral_tokenizer) -> None:
    slow = 1 / (PLACEHOLDER_DELAY_S + 0.5)  # the first word comes well after the delay
    fake = _answer(store, mistral_tokenizer, slow, "기준금리는 정책금리예요.")
    [placeholder] = fake.calls_to("chat.postMessage")
    assert placeholder.params["text"] == messages_ko.THINKING
    [start] = fake.calls_to("chat.startStream")
    assert start.at - placeholder.at >= 0.3
    assert [c.params["ts"] for c in fake.calls_to("chat.delete")] == [placeholder.response["ts"]]
    [answer] = [m for m in fake.messages(channel="C1") if m.get("bot_id")]
    assert answer["ts"] == start.response["ts"] and answer["text"] == "기준금리는 정책금리예요."
    assert [b["type"] for b in answer["blocks"]] == ["actions"]


def test_quick_start_streams_without_placeholder_and_ends_in_stop_stream(store, mistral_tokenizer) -> None:
    fake = _answer(store, mistral_tokenizer, 0, "기준금리는 정책금리예요. &lt;!here&gt;")
    assert fake.calls_to("chat.postMessage") == [] and fake.calls_to("chat.delete") == []
    assert [c.method for c in fake.calls if c.method.startswith("chat.")] == ["chat.startStream", "chat.stopStream"]
    [answer] = [m for m in fake.messages(channel="C1") if m.get("bot_id")]
    assert answer["text"].startswith("기준금리는 정책금리예요.") and answer.get("stream_state") == "stopped"
    assert [b["type"] for b in answer["blocks"]] == ["actions"]


def test_markdown_answer_is_rewritten_with_chat_update(store, mistral_tokenizer) -> None:
    fake = _answer(store, mistral_tokenizer, 0, "**기준금리**는 정책금리예요.")
    assert fake.calls_to("chat.postMessage") == []
    [update] = fake.calls_to("chat.update")
    assert update.params["text"].startswith("*기준금리*")
    [answer] = [m for m in fake.messages(channel="C1") if m.get("bot_id")]
    assert answer["text"].startswith("*기준금리*")
    assert [b["type"] for b in answer["blocks"]] == ["section", "actions"]
