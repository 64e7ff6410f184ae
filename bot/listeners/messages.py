"""Mentions, thread follow-ups, DMs and Q&A channels: every way a user asks finbot in conversation."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any

from slack_bolt import App, BoltContext
from slack_sdk import WebClient

from bot.replies import AnswerService, IncomingQuestion
from storage.conversations import ConversationStore

logger = logging.getLogger(__name__)

# Message subtypes that carry a user's new words; all others (edits, deletions, joins,
# bot posts, channel topic changes…) are not questions.
QUESTION_SUBTYPES = {None, "thread_broadcast", "file_share"}

QAChannelCheck = Callable[[str, str], bool]


@functools.lru_cache(maxsize=64)
def _mention_pattern(bot_user_id: str) -> re.Pattern[str]:
    return re.compile(rf"<@{re.escape(bot_user_id)}(\|[^>]*)?>")


def strip_bot_mention(text: str, bot_user_id: str | None) -> str:
    if bot_user_id:
        text = _mention_pattern(bot_user_id).sub(" ", text)
    return text.strip()


def _question_from(event: dict[str, Any], team_id: str, bot_user_id: str | None) -> IncomingQuestion:
    return IncomingQuestion(
        team_id=team_id,
        channel_id=event["channel"],
        thread_ts=event.get("thread_ts") or event["ts"],
        message_ts=event["ts"],
        user_id=event.get("user"),
        text=strip_bot_mention(event.get("text") or "", bot_user_id),
    )


def _team_of(body: dict[str, Any], event: dict[str, Any]) -> str:
    return body.get("team_id") or event.get("team") or "unknown-team"


def is_from_ignored_bot(event: dict[str, Any], answer_other_bots: bool) -> bool:
    """Other bots are answered only when configured to.

    finbot's own messages never get this far: Bolt's self-event middleware (on by default, see
    `bot.app.build_app`) acknowledges and drops them before any listener.
    """
    return (bool(event.get("bot_id")) or event.get("subtype") == "bot_message") and not answer_other_bots


def register(
    app: App,
    answers: AnswerService,
    store: ConversationStore,
    *,
    is_qa_channel: QAChannelCheck | None = None,
    answer_other_bots: bool = False,
) -> None:
    # Slack retries an event it thinks we missed; the database remembers every event id. The
    # event id is claimed in the same transaction that stores the question (see `submit`).
    question_subtypes = QUESTION_SUBTYPES | ({"bot_message"} if answer_other_bots else set())

    @app.event("app_mention")
    def on_mention(body: dict[str, Any], event: dict[str, Any], client: WebClient, context: BoltContext) -> None:
        if is_from_ignored_bot(event, answer_other_bots):
            return
        answers.submit(
            client, _question_from(event, _team_of(body, event), context.bot_user_id), event_id=body.get("event_id")
        )

    @app.event("message")
    def on_message(body: dict[str, Any], event: dict[str, Any], client: WebClient, context: BoltContext) -> None:
        if event.get("subtype") not in question_subtypes or is_from_ignored_bot(event, answer_other_bots):
            return  # edits, deletions, joins… of answered questions change nothing
        bot_user_id = context.bot_user_id
        text = event.get("text") or ""
        team_id = _team_of(body, event)
        if event.get("channel_type") != "im":
            if bot_user_id and f"<@{bot_user_id}" in text:
                return  # the app_mention event for this same message answers it
            thread_ts = event.get("thread_ts")
            if thread_ts is None:
                # Top level: only Q&A channels answer without a mention, and only words, not bare
                # files. The database lookup comes last: every top-level message in every channel
                # finbot is in arrives here.
                if not text.strip() or is_qa_channel is None or not is_qa_channel(team_id, event["channel"]):
                    return
            elif store.find_conversation(team_id, event["channel"], thread_ts) is None:
                return  # a thread finbot is not part of
        answers.submit(client, _question_from(event, team_id, bot_user_id), event_id=body.get("event_id"))
