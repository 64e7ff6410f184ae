"""Builds the Bolt app and the services behind it from settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from slack_bolt import App
from slack_sdk import WebClient

from bot.listeners import messages
from bot.replies import AnswerService
from bot.settings import FinbotSettings
from llm.engine import GenerationEngine
from storage.conversations import ConversationStore
from storage.db import create_db_engine, make_session_factory

logger = logging.getLogger(__name__)


@dataclass
class Finbot:
    app: App
    answers: AnswerService
    store: ConversationStore


def build_store(settings: FinbotSettings) -> ConversationStore:
    return ConversationStore(make_session_factory(create_db_engine(settings.database_url)))


def build_app(settings: FinbotSettings, engine: GenerationEngine, store: ConversationStore | None = None) -> Finbot:
    if settings.slack_bot_token is None:
        raise ValueError("SLACK_BOT_TOKEN is not set (see .env.example)")
    bot_token = settings.slack_bot_token.get_secret_value()
    client = WebClient(token=bot_token, base_url=settings.slack_api_url)
    signing_secret = settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None
    if settings.slack_mode == "http" and not signing_secret:
        raise ValueError("SLACK_SIGNING_SECRET is required in HTTP mode: Slack's requests are verified with it")
    app = App(
        token=bot_token,
        client=client,
        # Socket Mode needs no signing secret; HTTP mode verifies every request with it.
        signing_secret=signing_secret or "",
        request_verification_enabled=settings.slack_mode == "http",
        # Ack first, then run the listener: Slack's 3-second deadline never depends on the model.
        process_before_response=False,
    )
    store = store or build_store(settings)
    answers = AnswerService(
        store,
        engine,
        settings.sampling_params(),
        settings.max_prompt_tokens,
        workers=settings.generation_workers,
    )
    messages.register(app, answers, store)
    return Finbot(app=app, answers=answers, store=store)
