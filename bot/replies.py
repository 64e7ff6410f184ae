"""Answering a question in its Slack thread: store it, show progress, generate, post, store the answer."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot import messages_ko
from bot.formatting import to_mrkdwn
from llm.answering import answer_question
from llm.engine import GenerationEngine, SamplingParams
from llm.errors import EngineBusyError, PromptTooLongError
from storage.conversations import ConversationStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IncomingQuestion:
    team_id: str
    channel_id: str
    thread_ts: str
    message_ts: str
    user_id: str | None
    text: str

    @property
    def thread_ref(self) -> str:
        """How operators find the thread in logs."""
        return f"{self.team_id}/{self.channel_id}/{self.thread_ts}"


class AnswerService:
    """Owns the generation workers so Bolt's listener threads return at once."""

    def __init__(
        self,
        store: ConversationStore,
        engine: GenerationEngine,
        params: SamplingParams,
        max_prompt_tokens: int,
        workers: int = 4,
    ) -> None:
        self._store = store
        self._engine = engine
        self._params = params
        self._max_prompt_tokens = max_prompt_tokens
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="finbot-answer")
        self._closed = threading.Event()

    def submit(self, client: WebClient, question: IncomingQuestion) -> Future[None] | None:
        """Store the question, acknowledge it in the thread and generate in the background.

        Returns None when nothing is to be done (empty question, or a Slack message already stored).
        """
        if not question.text.strip():
            self._post(client, question, messages_ko.EMPTY_QUESTION)
            return None
        conversation_id = self._store.get_or_create_conversation(
            question.team_id, question.channel_id, question.thread_ts
        )
        message_id = self._store.add_user_message(
            conversation_id, question.text, question.user_id, question.message_ts
        )
        if message_id is None:
            logger.info("message %s in %s already stored; not answering twice", question.message_ts, question.thread_ref)
            return None
        placeholder_ts = self._post(client, question, messages_ko.THINKING)
        return self._executor.submit(
            self._answer, client, question, conversation_id, message_id, placeholder_ts
        )

    def shutdown(self, wait: bool = True) -> None:
        self._closed.set()
        self._executor.shutdown(wait=wait, cancel_futures=not wait)

    def _answer(
        self,
        client: WebClient,
        question: IncomingQuestion,
        conversation_id: int,
        message_id: int,
        placeholder_ts: str | None,
    ) -> None:
        self._store.set_status(message_id, "generating")
        try:
            history = self._store.history(conversation_id, before_message_id=message_id)
            answer = answer_question(
                self._engine, history, question.text, self._params, self._max_prompt_tokens
            )
        except PromptTooLongError as error:
            logger.warning("question in %s is too long: %s", question.thread_ref, error)
            self._store.set_status(message_id, "failed", str(error))
            self._post_or_update(client, question, placeholder_ts, messages_ko.QUESTION_TOO_LONG)
            return
        except EngineBusyError as error:
            logger.warning("engine busy, question in %s deferred to the user: %s", question.thread_ref, error)
            self._store.set_status(message_id, "failed", "engine busy")
            self._post_or_update(client, question, placeholder_ts, messages_ko.ENGINE_BUSY)
            return
        except Exception as error:
            logger.exception("generation failed for question %d in %s", message_id, question.thread_ref)
            self._store.set_status(message_id, "failed", repr(error))
            self._post_or_update(client, question, placeholder_ts, messages_ko.GENERATION_FAILED)
            return

        if not answer:
            answer = messages_ko.EMPTY_ANSWER
        posted_ts = self._post_or_update(client, question, placeholder_ts, to_mrkdwn(answer))
        self._store.add_assistant_message(conversation_id, answer, reply_to_id=message_id, slack_ts=posted_ts)
        logger.info("answered question %d in %s (%d chars)", message_id, question.thread_ref, len(answer))

    def _post(self, client: WebClient, question: IncomingQuestion, text: str) -> str | None:
        try:
            response = client.chat_postMessage(
                channel=question.channel_id, thread_ts=question.thread_ts, text=text, unfurl_links=False
            )
        except SlackApiError as error:
            logger.error("could not post in %s: %s", question.thread_ref, error.response.get("error"))
            return None
        return response.get("ts")

    def _post_or_update(
        self, client: WebClient, question: IncomingQuestion, placeholder_ts: str | None, text: str
    ) -> str | None:
        """Replace the placeholder with the final text; post anew if the placeholder is gone."""
        if placeholder_ts is not None:
            try:
                client.chat_update(channel=question.channel_id, ts=placeholder_ts, text=text)
                return placeholder_ts
            except SlackApiError as error:
                logger.warning(
                    "could not update placeholder in %s (%s); posting instead",
                    question.thread_ref, error.response.get("error"),
                )
        return self._post(client, question, text)
