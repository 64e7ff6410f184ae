"""Builds the Bolt app and the services behind it from settings."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from slack_bolt import App
from slack_sdk import WebClient
from slack_sdk.http_retry import HttpRequest as RetryRequest
from slack_sdk.http_retry import HttpResponse as RetryResponse
from slack_sdk.http_retry import RetryHandler, RetryIntervalCalculator, RetryState
from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, ServerErrorRetryHandler
from sqlalchemy.orm import Session, sessionmaker

from bot import metrics
from bot.allowlist import register_allowlist
from bot.instance import current_instance_id
from bot.listeners import messages
from bot.metrics import MeteredWebClient
from bot.replies import AnswerService
from bot.settings import FinbotSettings
from bot.term_catalog import TermCatalog, load_terms
from bot.term_of_day import TermOfDayService, register_today_subcommand
from llm.engine import GenerationEngine
from storage.answer_timings import AnswerTimingStore
from storage.conversations import ConversationStore
from storage.db import open_database
from storage.leases import QuestionLeases

logger = logging.getLogger(__name__)

# Slack's Web API answering HTTP 5xx, or not reachable: each call is retried this many times with
# exponential backoff (0.5, 1, 2, 4, then 5 s, see bot.streaming.server_error_delay), about 33 s in
# all, before its caller sees the error. An outage of 20-30 s is then only a delay: the answer's
# streaming pauses (its text keeps accumulating) and the final message is posted after it.
# Rate limits (429) are not retried here: the streaming code postpones its next batch by Retry-After
# instead of blocking, and waits out the final calls itself.
SLACK_MAX_RETRIES = 9
SERVER_ERROR_STATUSES = frozenset({500, 502, 503, 504})


class _SlackBackoff(RetryIntervalCalculator):
    def calculate_sleep_duration(self, current_attempt: int) -> float:
        from bot.streaming import server_error_delay

        return server_error_delay(current_attempt + 1)


class _LoggedRetry(RetryHandler):
    """Sleeps like slack-sdk's handlers, and tells the operator: one WARNING line per retry.

    The line names the API method and the reason, never the request: the token travels in a header.
    """

    def prepare_for_next_attempt(
        self,
        *,
        state: RetryState,
        request: RetryRequest,
        response: RetryResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        delay = self.interval_calculator.calculate_sleep_duration(state.current_attempt)
        method = request.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        reason = f"answered HTTP {response.status_code}" if response is not None else f"unreachable ({error})"
        metrics.slack_retry(method, f"http_{response.status_code}" if response is not None else "connection_error")
        logger.warning(
            "Slack API %s %s; retry %d of %d in %.1f s",
            method, reason, state.current_attempt + 1, self.max_retry_count, delay,
        )
        state.next_attempt_requested = True
        time.sleep(delay)
        state.increment_current_attempt()


class SlackServerErrorRetryHandler(_LoggedRetry, ServerErrorRetryHandler):
    """Retries HTTP 500/502/503/504, with or without Slack's JSON body (e.g. a proxy's HTML page).

    A 5xx almost always means Slack did not carry the call out, so retrying it is what saves the
    answer. The trade-off: if Slack did post the message and still answered 5xx, a retried
    chat.postMessage shows it twice (appendStream/update/stopStream repeat harmlessly or fail
    visibly). A lost answer is worse than that rare duplicate.
    """

    def _can_retry(
        self,
        *,
        state: RetryState,
        request: RetryRequest,
        response: RetryResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        return response is not None and response.status_code in SERVER_ERROR_STATUSES


class SlackConnectionErrorRetryHandler(_LoggedRetry, ConnectionErrorRetryHandler):
    """Retries a refused or reset connection (slack-sdk's list; a read timeout is not retried)."""


def slack_retry_handlers(max_retries: int = SLACK_MAX_RETRIES) -> list[RetryHandler]:
    """The retry policy of every WebClient finbot makes (server errors, connection failures)."""
    backoff = _SlackBackoff()
    return [
        SlackServerErrorRetryHandler(max_retry_count=max_retries, interval_calculator=backoff),
        SlackConnectionErrorRetryHandler(max_retry_count=max_retries, interval_calculator=backoff),
    ]


def build_web_client(settings: FinbotSettings) -> WebClient:
    """The bot's Web API client: SLACK_API_URL, the bot token, and the retries above."""
    token = settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None
    return MeteredWebClient(token=token, base_url=settings.slack_api_url, retry_handlers=slack_retry_handlers())


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
    from storage.stored_settings import StoredSettingStore
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
    service = TermOfDayService(
        config=config,
        posts=posts,
        conversations=store,
        engine=engine,
        client=client,
        terms=terms if terms is not None else TermCatalog(load_terms()),
        sampling=settings.sampling_params(),
        max_prompt_tokens=settings.max_prompt_tokens,
        stored_settings=StoredSettingStore(store.session_factory),
    )
    # Channels and time an admin set in the Home tab override TERM_OF_DAY_CHANNELS / _TIME.
    service.refresh_settings_or_warn()
    return service


def register_home(app: App, settings: FinbotSettings, answers: AnswerService, term_of_day: TermOfDayService) -> None:
    """The App Home tab (bot/home.py): for everyone, and the admin part for ADMIN_USER_IDS."""
    from bot.home import HomeService
    from bot.listeners import home
    from storage.feedback import FeedbackStore
    from storage.qa_channels import QAChannelStore

    session_factory = answers.questions.session_factory
    service = HomeService(
        questions=answers.questions,
        feedback=FeedbackStore(session_factory),
        timings=AnswerTimingStore(session_factory),
        qa_channels=QAChannelStore(session_factory),
        configured_qa=settings.qa_channel_ids(),
        term_of_day=term_of_day,
        admins=settings.admin_user_id_set(),
        slash_command=settings.slash_command,
        timezone=settings.timezone,
    )
    home.register(app, service)


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
    client = build_web_client(settings)
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
        leases=QuestionLeases(
            store.session_factory, current_instance_id(), timedelta(seconds=settings.question_lease_s)
        ),
        timings=AnswerTimingStore(store.session_factory),
        **slack_experience_options(settings),
    )
    metrics.meter_bolt_clients(app)
    register_allowlist(app, settings.allowed_team_id_set(), settings.allowed_channel_id_set())
    # Parsed and indexed once: `/용어` and the term of the day share it.
    catalog = TermCatalog(load_terms())
    register_slack_experience(app, settings, answers, store, catalog)
    term_of_day = build_term_of_day(settings, engine, store, client, catalog)
    register_today_subcommand(term_of_day)  # `/용어 오늘`
    register_home(app, settings, answers, term_of_day)
    return Finbot(app=app, answers=answers, store=store, term_of_day=term_of_day)
