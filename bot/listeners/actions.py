"""Button clicks: 👍/👎 feedback under answers and ↻ under term lookups."""

from __future__ import annotations

import json
import logging
from typing import Any

from slack_bolt import Ack, App, Respond
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot import messages_ko, metrics
from bot.listeners.slash import REGENERATE_ACTION, TermLookupService
from bot.replies import FEEDBACK_DOWN_ACTION, FEEDBACK_UP_ACTION
from storage.feedback import FeedbackStore
from storage.questions import QuestionStore

logger = logging.getLogger(__name__)


def register(app: App, questions: QuestionStore, feedback: FeedbackStore, terms: TermLookupService) -> None:
    def on_feedback(ack: Ack, body: dict[str, Any], action: dict[str, Any], client: WebClient) -> None:
        ack()
        vote = 1 if action.get("action_id") == FEEDBACK_UP_ACTION else -1
        user = (body.get("user") or {}).get("id") or "unknown-user"
        channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id")
        message = body.get("message") or {}
        thread_ts = message.get("thread_ts") or (body.get("container") or {}).get("thread_ts")
        try:
            question_id = int(action.get("value") or "")
        except ValueError:
            logger.warning("feedback click with a malformed value %r", action.get("value"))
            return
        answer_id = questions.answer_of(question_id)
        if answer_id is None:
            logger.warning("feedback on question %d, which has no stored answer", question_id)
            text = messages_ko.FEEDBACK_MISSING
        else:
            new = feedback.vote(answer_id, user, vote)
            metrics.feedback_vote(vote)
            logger.info(
                "feedback %+d by %s on answer %d (%s) in %s/%s",
                vote, user, answer_id, "new" if new else "changed", channel, thread_ts,
            )
            text = messages_ko.FEEDBACK_THANKS_UP if vote > 0 else messages_ko.FEEDBACK_THANKS_DOWN
        if channel:
            try:
                client.chat_postEphemeral(channel=channel, user=user, thread_ts=thread_ts, text=text)
            except SlackApiError as error:
                logger.warning("could not thank %s in %s: %s", user, channel, error.response.get("error"))

    app.action(FEEDBACK_UP_ACTION)(on_feedback)
    app.action(FEEDBACK_DOWN_ACTION)(on_feedback)

    @app.action(REGENERATE_ACTION)
    def on_regenerate(ack: Ack, action: dict[str, Any], respond: Respond, body: dict[str, Any]) -> None:
        ack()
        try:
            value = json.loads(action.get("value") or "")
            key, name = str(value["key"]), str(value["term"])
        except (ValueError, KeyError, TypeError):
            logger.warning("regenerate click with a malformed value %r", action.get("value"))
            return
        logger.info("term %r regenerated at the request of %s", key, (body.get("user") or {}).get("id"))
        terms.regenerate(respond, key, name)
