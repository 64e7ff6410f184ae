"""The message listeners in one process with Bolt's real middleware: which events become questions."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from slack_bolt import App, BoltRequest
from slack_sdk import WebClient

from bot.listeners import messages
from bot.replies import IncomingQuestion
from tests.fakes.slack_server import FakeSlack


class RecordingAnswers:
    def __init__(self) -> None:
        self.questions: list[IncomingQuestion] = []

    def submit(self, client: WebClient, question: IncomingQuestion, **_: Any) -> None:
        self.questions.append(question)


class NoThreads:
    def find_conversation(self, team_id: str, channel_id: str, thread_ts: str) -> int | None:
        return None


@pytest.fixture
def fake() -> Iterator[FakeSlack]:
    with FakeSlack() as server:
        yield server


def _app(fake: FakeSlack, answers: RecordingAnswers, qa_checks: list[str], *, answer_other_bots: bool) -> App:
    # Built like `bot.app.build_app`: Bolt's defaults, so its self-event middleware is on.
    app = App(
        client=WebClient(token=fake.bot_token, base_url=fake.api_url),
        signing_secret="",
        request_verification_enabled=False,
        process_before_response=True,
    )

    def is_qa_channel(team_id: str, channel_id: str) -> bool:
        qa_checks.append(channel_id)
        return channel_id == "CQA"

    messages.register(
        app, answers, NoThreads(), is_qa_channel=is_qa_channel, answer_other_bots=answer_other_bots  # type: ignore[arg-type]
    )
    return app


def _dispatch(app: App, fake: FakeSlack, event: dict[str, Any]) -> None:
    body = {
        "token": "x", "team_id": fake.team_id, "api_app_id": fake.app_id, "event": event,
        "type": "event_callback", "event_id": "Ev" + uuid.uuid4().hex[:10], "event_time": 1,
    }
    assert app.dispatch(BoltRequest(body=body, mode="socket_mode")).status == 200


def test_own_messages_are_never_answered_even_when_other_bots_are(fake: FakeSlack) -> None:
    answers = RecordingAnswers()
    app = _app(fake, answers, [], answer_other_bots=True)
    own = dict(user=fake.bot_user_id, bot_id=fake.bot_id, channel="DX", channel_type="im")
    _dispatch(app, fake, fake.message_event("제 답변이에요", **own))
    _dispatch(app, fake, fake.message_event("제 답변이에요", subtype="bot_message", **own))
    assert answers.questions == []
    _dispatch(app, fake, fake.message_event("다른 봇 질문", user="UB", bot_id="BOTHER", channel="DX",
                                            channel_type="im", subtype="bot_message"))
    assert [q.text for q in answers.questions] == ["다른 봇 질문"]


def test_other_bots_are_ignored_by_default(fake: FakeSlack) -> None:
    answers = RecordingAnswers()
    app = _app(fake, answers, [], answer_other_bots=False)
    _dispatch(app, fake, fake.message_event("다른 봇 질문", user="UB", bot_id="BOTHER", channel="DX",
                                            channel_type="im", subtype="bot_message"))
    _dispatch(app, fake, fake.mention_event("다른 봇 멘션", user="UB") | {"bot_id": "BOTHER"})
    assert answers.questions == []


def test_top_level_messages_without_words_never_reach_the_qa_channel_lookup(fake: FakeSlack) -> None:
    answers = RecordingAnswers()
    qa_checks: list[str] = []
    app = _app(fake, answers, qa_checks, answer_other_bots=False)
    _dispatch(app, fake, fake.message_event("   ", channel="CQA"))
    _dispatch(app, fake, fake.message_event("", channel="CQA", subtype="file_share", files=[{"id": "F1"}]))
    assert qa_checks == [] and answers.questions == []
    _dispatch(app, fake, fake.message_event("환율이 뭐야?", channel="CQA"))
    _dispatch(app, fake, fake.message_event("잡담이에요", channel="COTHER"))
    assert qa_checks == ["CQA", "COTHER"]
    assert [(q.channel_id, q.text) for q in answers.questions] == [("CQA", "환율이 뭐야?")]
