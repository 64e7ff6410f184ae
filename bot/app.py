"""Builds the Bolt app and the services behind it from settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from slack_bolt import App
from slack_sdk import WebClient
from sqlalchemy.orm import Session, sessionmaker

from bot.allowlist import register_allowlist
from bot.listeners import messages
from bot.replies import AnswerService
from bot.settings import FinbotSettings
from bot.term_catalog import TermCatalog, load_terms
from bot.term_of_day import TermOfDayService, register_today_subcommand
from llm.engine import GenerationEngine
from storage.conversations import ConversationStore
from storage.db import open_database

logger = logging.getLogger(__name__)


@dataclass
class Finbot:
    app: App
    answers: AnswerService
    store: ConversationStore
    term_of_day: TermOfDayService | None = None

    @property
    def session_factory(self) -> sessionmaker[Session]:
        """The one database engine every store of this process shares."""
        return self.store.session_factory


def build_term_of_day(
    settings: FinbotSettings,
    engine: GenerationEngine | None,
    store: ConversationStore,
    client: WebClient,
    terms: TermCatalog | None = None,
) -> TermOfDayService:
    """The 오늘의 금융용어 service, on the conversation store's database.

    `engine` may be None for a service that only plans (`finbot term today --dry-run`); `terms`
    defaults to the shipped catalog.
    """
    from bot.term_of_day import TermOfDayConfig
    from storage.term_posts import TermPostStore

    config = TermOfDayConfig(
        channels=settings.term_of_day_channel_ids(),
        timezone=settings.timezone,
        post_time=settings.term_of_day_post_time(),
        include_weekends=settings.term_of_day_include_weekends,
        include_holidays=settings.term_of_day_include_holidays,
        catch_up_grace=timedelta(minutes=settings.term_of_day_grace_minutes),
        stale_after=timedelta(minutes=settings.term_of_day_stale_claim_minutes),
        generation_attempts=settings.term_of_day_generation_attempts,
    )
    posts = TermPostStore(store.session_factory)
    return TermOfDayService(
        config=config,
        posts=posts,
        conversations=store,
        engine=engine,
        client=client,
        terms=terms if terms is not None else TermCatalog(load_terms()),
        sampling=settings.sampling_params(),
        max_prompt_tokens=settings.max_prompt_tokens,
    )


def slack_experience_options(settings: FinbotSettings) -> dict[str, Any]:
    """AnswerService options for streaming, splitting and rate limits (see "# Slack experience")."""
    from bot.rate_limits import QuestionRateLimiter
    from bot.streaming import StreamingModes, StreamSettings

    return {
        "stream_settings": StreamSettings(
            flush_seconds=settings.stream_flush_seconds,
            flush_chars=settings.stream_flush_chars,
            message_limit=settings.slack_message_max_chars,
        ),
        "streaming_modes": StreamingModes(native_enabled=settings.slack_native_streaming),
        "rate_limiter": QuestionRateLimiter(
            settings.rate_limit_per_user, settings.rate_limit_per_channel, settings.rate_limit_window_s
        ),
    }


def register_slack_experience(
    app: App, settings: FinbotSettings, answers: AnswerService, store: ConversationStore, catalog: TermCatalog
) -> None:
    """Messages, Q&A channels, the assistant pane, the term slash command and button clicks."""
    from bot.listeners import actions, assistant, slash
    from storage.feedback import FeedbackStore
    from storage.qa_channels import QAChannelStore
    from storage.term_lookups import TermLookupStore

    session_factory = store.session_factory
    qa_channels = QAChannelStore(session_factory)
    configured_qa = settings.qa_channel_ids()

    def is_qa_channel(team_id: str, channel_id: str) -> bool:
        return channel_id in configured_qa or qa_channels.is_qa_channel(team_id, channel_id)

    messages.register(
        app, answers, store, is_qa_channel=is_qa_channel, answer_other_bots=settings.answer_other_bots
    )
    assistant.register(app, answers, store)
    max_age = timedelta(hours=settings.term_lookup_max_age_hours) if settings.term_lookup_max_age_hours else None
    terms = slash.TermLookupService(
        answers, TermLookupStore(session_factory), catalog, max_age, settings.term_lookup_visibility
    )
    slash.register(app, settings.slash_command, terms, qa_channels)
    actions.register(app, answers.questions, FeedbackStore(session_factory), terms)


def build_app(settings: FinbotSettings, engine: GenerationEngine, store: ConversationStore | None = None) -> Finbot:
    if settings.slack_bot_token is None:
        raise ValueError("SLACK_BOT_TOKEN is not set (see .env.example)")
    bot_token = settings.slack_bot_token.get_secret_value()
    client = WebClient(token=bot_token, base_url=settings.slack_api_url)
    signing_secret = settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None
    if settings.slack_mode == "http" and not signing_secret:
        raise ValueError("SLACK_SIGNING_SECRET is required in HTTP mode: Slack's requests are verified with it")
    app = App(
        client=client,
        # Socket Mode needs no signing secret; HTTP mode verifies every request with it.
        signing_secret=signing_secret or "",
        request_verification_enabled=settings.slack_mode == "http",
        # Ack first, then run the listener: Slack's 3-second deadline never depends on the model.
        process_before_response=False,
    )
    store = store or ConversationStore(open_database(settings.database_url))
    answers = AnswerService(
        store,
        engine,
        settings.sampling_params(),
        settings.max_prompt_tokens,
        workers=settings.generation_workers,
        timeout_s=settings.generation_timeout_s,
        **slack_experience_options(settings),
    )
    register_allowlist(app, settings.allowed_team_id_set(), settings.allowed_channel_id_set())
    # Parsed and indexed once: `/용어` and the term of the day share it.
    catalog = TermCatalog(load_terms())
    register_slack_experience(app, settings, answers, store, catalog)
    term_of_day = build_term_of_day(settings, engine, store, client, catalog)
    register_today_subcommand(term_of_day)  # `/용어 오늘`
    return Finbot(app=app, answers=answers, store=store, term_of_day=term_of_day)
