"""Slack's AI assistant pane (Bolt's `Assistant`): suggested prompts, status, title, answers.

The pane is a DM thread with the app; questions there go through the same `AnswerService` (same
conversation store, same engine) as mentions, with a status instead of a placeholder message.
"""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt import App, Assistant, SetStatus, SetSuggestedPrompts, SetTitle
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot import messages_ko
from bot.replies import AnswerService, IncomingQuestion
from storage.conversations import ConversationStore

logger = logging.getLogger(__name__)

TITLE_MAX_CHARS = 60


def thread_title(question: str) -> str:
    title = " ".join(question.split())
    return title if len(title) <= TITLE_MAX_CHARS else title[: TITLE_MAX_CHARS - 1] + "…"


def build_assistant(answers: AnswerService, store: ConversationStore) -> Assistant:
    assistant = Assistant()

    @assistant.thread_started
    def on_thread_started(say: Any, set_suggested_prompts: SetSuggestedPrompts, payload: dict[str, Any]) -> None:
        thread = payload.get("assistant_thread", {})
        try:
            say(messages_ko.ASSISTANT_GREETING)
            set_suggested_prompts(
                prompts=[{"title": title, "message": message} for title, message in messages_ko.ASSISTANT_PROMPTS],
                title=messages_ko.ASSISTANT_PROMPTS_TITLE,
            )
        except SlackApiError as error:
            logger.warning(
                "could not greet in assistant thread %s/%s: %s",
                thread.get("channel_id"), thread.get("thread_ts"), error.response.get("error"),
            )

    @assistant.user_message
    def on_user_message(
        payload: dict[str, Any],
        body: dict[str, Any],
        client: WebClient,
        set_status: SetStatus,
        set_title: SetTitle,
    ) -> None:
        event = payload
        if event.get("subtype") not in (None, "file_share"):
            return
        team_id = body.get("team_id") or event.get("team") or "unknown-team"
        question = IncomingQuestion(
            team_id=team_id,
            channel_id=event["channel"],
            thread_ts=event["thread_ts"],
            message_ts=event["ts"],
            user_id=event.get("user"),
            text=(event.get("text") or "").strip(),
        )
        first_question = store.find_conversation(team_id, question.channel_id, question.thread_ts) is None

        def show_progress() -> None:
            # Only once the question is stored: a redelivered event must not leave a status behind
            # that no answer will ever clear.
            try:
                if first_question:
                    set_title(thread_title(question.text))
                set_status(messages_ko.ASSISTANT_STATUS)
            except SlackApiError as error:
                logger.warning(
                    "assistant status/title failed in %s: %s", question.target.thread_ref, error.response.get("error")
                )

        answers.submit(client, question, placeholder=False, event_id=body.get("event_id"), on_stored=show_progress)

    return assistant


def register(app: App, answers: AnswerService, store: ConversationStore) -> None:
    app.assistant(build_assistant(answers, store))
