"""Answering in a thread (AnswerService with the fake Slack server and a real SQLite database):
a follow-up question reaches the engine after the thread's earlier question and answer."""

from __future__ import annotations

from pathlib import Path

import pytest
from slack_sdk import WebClient

from bot.replies import AnswerService, IncomingQuestion
from llm.engine import FakeEngine, SamplingParams
from llm.prompt import encode_prompt
from storage.conversations import ConversationStore
from storage.db import open_database, upgrade_database
from tests.fakes.slack_server import FakeSlack

MAX_PROMPT_TOKENS = 512
FIRST_QUESTION = "기준금리가 뭐야?"
FOLLOW_UP = "그럼 지금은 몇 퍼센트야?"


class RecordingEngine(FakeEngine):
    """The fake engine, keeping every prompt's ids (its reply says how many earlier turns it saw)."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer, "기준금리는 한국은행이 정하는 정책금리예요. 이전 대화 {history_turns}개.")
        self.prompts: list[list[int]] = []

    def stream(self, prompt_ids, params, cancel=None):
        self.prompts.append(list(prompt_ids))
        return super().stream(prompt_ids, params, cancel)


@pytest.fixture
def store(tmp_path: Path) -> ConversationStore:
    url = f"sqlite:///{tmp_path / 'finbot.db'}"
    upgrade_database(url)
    return ConversationStore(open_database(url))


def test_a_follow_up_is_answered_with_the_threads_earlier_question_and_answer(store, mistral_tokenizer):
    engine = RecordingEngine(mistral_tokenizer)
    service = AnswerService(store, engine, SamplingParams(), MAX_PROMPT_TOKENS, workers=1)
    try:
        with FakeSlack() as fake:
            client = WebClient(token=fake.bot_token, base_url=fake.api_url)
            thread = fake.next_ts()
            for message_ts, text in ((thread, FIRST_QUESTION), (fake.next_ts(), FOLLOW_UP)):
                future = service.submit(
                    client, IncomingQuestion(fake.team_id, "C1", thread, message_ts, "U1", text)
                )
                assert future is not None
                future.result(timeout=30)
            answers = [m["text"] for m in fake.messages(channel="C1", thread_ts=thread) if m.get("bot_id")]
    finally:
        service.shutdown()

    assert len(answers) == 2 and len(engine.prompts) == 2
    first_answer = answers[0]
    assert first_answer == "기준금리는 한국은행이 정하는 정책금리예요. 이전 대화 0개."
    # The follow-up's prompt holds the first question and the answer the user saw, in Mistral's layout.
    follow_up_prompt = mistral_tokenizer.decode(engine.prompts[1])
    assert FIRST_QUESTION in follow_up_prompt and first_answer in follow_up_prompt, follow_up_prompt
    assert engine.prompts[1] == encode_prompt(
        mistral_tokenizer, [(FIRST_QUESTION, first_answer)], FOLLOW_UP, MAX_PROMPT_TOKENS
    )
    assert answers[1].endswith("이전 대화 1개.")  # the model answered knowing the earlier turn
