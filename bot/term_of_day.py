"""오늘의 금융용어: post one term with the model's explanation per channel per Korean business day.

One run for a (channel, day) goes:

1. business day? (`bot.business_days`, weekends/holidays switchable) and inside the posting window
   [post time, post time + grace) of *today* in the configured timezone? A job that fires late, or
   a bot that starts later the same day, still posts within the grace; after it, or on another
   day, nothing is posted: yesterday's term is never posted today.
2. choose the term (`choose_next_term`: the operator's pin for the date, else no repeats within the
   channel's history in the database until the catalog is exhausted).
3. claim (channel, day) in the database *before* generating (`TermPostStore.claim`). A second
   instance, a retried job or a second thread gets None and does nothing. A claim still 'claimed'
   after `stale_after` belongs to a crashed instance and is taken over, but the new owner first
   looks in the channel's history for a post carrying this day's metadata (the crashed owner may
   have posted and died before recording it) and only posts when there is none.
4. generate with a definition-first instruction in the seed's prompt form, cleaned; bounded
   retries, then a fallback text (the term and a short Korean note) rather than nothing.
5. confirm the claim is still ours, post the Block Kit message, record it, and store the thread as
   a conversation whose first turn is "<term>이(가) 뭐야?" → explanation, so follow-ups in the thread
   are answered like any conversation with the term as history.

Everything takes an injected `now()` (timezone-aware), so tests run any day at any time instantly.
"""

from __future__ import annotations

import logging
import time as time_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from slack_sdk import WebClient

from bot import messages_ko, metrics
from bot.business_days import holiday_name, is_business_day, next_business_day
from bot.formatting import split_message, to_mrkdwn
from bot.instance import current_instance_id, owner_is_gone
from bot.scheduler import FinbotScheduler
from bot.term_catalog import Term, as_catalog, choose_next_term, find_term, normalize_term_key
from llm.answering import answer_question
from llm.engine import GenerationEngine, SamplingParams
from storage.conversations import ConversationStore
from storage.stored_settings import StoredSettingStore
from storage.term_posts import Claim, StoredTermPost, TermPostStore

logger = logging.getLogger(__name__)

# Slack's limits: a section's text and a header's plain text.
SECTION_TEXT_LIMIT = 3000
HEADER_TEXT_LIMIT = 150
# Marks our posts in Slack so a takeover of a stale claim can see whether the crashed owner posted.
METADATA_EVENT_TYPE = "finbot_term_of_day"
TERM_OF_DAY_JOB_ID = "term-of-day"
TERM_OF_DAY_CATCH_UP_JOB_ID = "term-of-day-catch-up"
TERM_OF_DAY_SETTINGS_JOB_ID = "term-of-day-settings"
# Admins' overrides of TERM_OF_DAY_CHANNELS and TERM_OF_DAY_TIME (Home tab, storage.stored_settings).
CHANNELS_SETTING = "term_of_day.channels"
TIME_SETTING = "term_of_day.time"
# Other instances on the database pick an admin's change up this often (the one it was made on: at once).
SETTINGS_REFRESH_INTERVAL = timedelta(seconds=30)
TODAY_SUBCOMMAND = "오늘"
_WEEKDAYS_KO = "월화수목금토일"


# ---------------------------------------------------------------------------- Korean text helpers


def _last_hangul_has_batchim(text: str) -> bool | None:
    """Whether the last Hangul syllable in `text` ends in a consonant; None without Hangul."""
    for char in reversed(text):
        code = ord(char) - 0xAC00
        if 0 <= code < 11172:
            return code % 28 != 0
        if char.isalnum():
            return None  # ends in Latin letters or digits: the reading (and so the particle) is unknown
    return None


def with_particle(word: str, consonant_form: str, vowel_form: str) -> str:
    """`word` with the right particle: 기준금리가 / 환율이; both forms ("이(가)") when it can't tell."""
    batchim = _last_hangul_has_batchim(word)
    if batchim is None:
        return f"{word}{consonant_form}({vowel_form})"
    return word + (consonant_form if batchim else vowel_form)


def term_question(term: str) -> str:
    """The first user turn of the post's thread, e.g. "기준금리가 뭐야?"."""
    return f"{with_particle(term, '이', '가')} 뭐야?"


def definition_instruction(term: str) -> str:
    """The definition-first instruction sent to the model (wrapped as `[INST]... [/INST]`)."""
    quoted = with_particle(f"'{term}'", "이라는", "라는")
    return f"{quoted} 금융·경제 용어의 뜻을 먼저 한두 문장으로 정의하고, 예시와 함께 쉽게 설명해줘."


def korean_date(day: date) -> str:
    return f"{day.year}년 {day.month}월 {day.day}일 ({_WEEKDAYS_KO[day.weekday()]})"


# ---------------------------------------------------------------------------- Block Kit


def build_post(term: Term, explanation: str, day: date) -> tuple[str, list[dict[str, Any]]]:
    """(fallback text, blocks) of the term-of-the-day message; `explanation` is cleaned model text."""
    title = term.term if not term.english else f"{term.term} ({term.english})"
    header = messages_ko.TERM_OF_DAY_HEADER.format(term=title)
    if len(header) > HEADER_TEXT_LIMIT:
        header = header[: HEADER_TEXT_LIMIT - 1] + "…"
    blocks: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}}]
    for chunk in split_message(to_mrkdwn(explanation), SECTION_TEXT_LIMIT):
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": chunk}})
    blocks.append(
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": messages_ko.TERM_OF_DAY_CONTEXT.format(category=term.category, date=korean_date(day)),
                }
            ],
        }
    )
    blocks.append({"type": "divider"})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": messages_ko.TERM_OF_DAY_INVITE}]})
    text = messages_ko.TERM_OF_DAY_TEXT.format(term=title)
    return text, blocks


@dataclass(frozen=True)
class TodayMessage:
    """What `/용어 오늘` answers: blocks when there is a post, otherwise only a Korean text."""

    text: str
    blocks: list[dict[str, Any]] | None = None

    def as_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"text": self.text}
        if self.blocks is not None:
            payload["blocks"] = self.blocks
        return payload


# ---------------------------------------------------------------------------- the service


@dataclass(frozen=True)
class TermOfDayConfig:
    channels: tuple[str, ...]
    timezone: str = "Asia/Seoul"
    post_time: time = time(9, 0)
    include_weekends: bool = False
    include_holidays: bool = False
    # How long after the post time a late job or a later start still posts (same day only).
    catch_up_grace: timedelta = timedelta(hours=6)
    # A claim still 'claimed' this long after it was made (or confirmed) belongs to a dead instance.
    stale_after: timedelta = timedelta(minutes=30)
    generation_attempts: int = 3
    retry_delay: timedelta = timedelta(seconds=5)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class PostOutcome:
    channel_id: str
    day: date
    # posted | fallback (posted without a generated explanation) | skipped | failed
    status: str
    term: str | None = None
    slack_ts: str | None = None
    reason: str | None = None


def default_instance_id() -> str:
    return current_instance_id()


@dataclass
class TermOfDayService:
    config: TermOfDayConfig
    posts: TermPostStore
    conversations: ConversationStore
    # None for a service that only plans (`finbot term today --dry-run`): no model is loaded.
    engine: GenerationEngine | None
    client: WebClient
    terms: Sequence[Term]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_prompt_tokens: int = 3072
    now: Callable[[], datetime] | None = None
    instance_id: str = field(default_factory=default_instance_id)
    sleep: Callable[[float], None] = time_module.sleep
    # Admins' overrides of the channels and the time (Home tab); None: the environment's only.
    stored_settings: StoredSettingStore | None = None
    _team_id: str | None = field(default=None, init=False, repr=False)
    # The scheduler this service's jobs are on, once scheduled (`schedule_term_of_day`).
    _scheduler: FinbotScheduler | None = field(default=None, init=False, repr=False)
    _env_config: TermOfDayConfig | None = field(default=None, init=False, repr=False)
    overridden: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        # Indexed once here: every post and every `/용어 오늘` looks terms up by alias.
        self.terms = as_catalog(self.terms)
        self._env_config = self.config

    # ------------------------------------------------------------------ settings from the Home tab

    def refresh_settings(self) -> bool:
        """Apply the stored channels and time (or the environment's, when none are stored); reschedules
        the daily job when they changed. True when something changed. Runs every
        SETTINGS_REFRESH_INTERVAL, and at once after an admin's change on this instance."""
        assert self._env_config is not None
        stored = self.stored_settings.values((CHANNELS_SETTING, TIME_SETTING)) if self.stored_settings else {}
        channels, post_time = self._env_config.channels, self._env_config.post_time
        if CHANNELS_SETTING in stored:
            channels = tuple(c for c in (p.strip() for p in stored[CHANNELS_SETTING].split(",")) if c)
        if TIME_SETTING in stored:
            try:
                post_time = time.fromisoformat(stored[TIME_SETTING])
            except ValueError:
                logger.warning("term of the day: stored time %r is not HH:MM; using %s",
                               stored[TIME_SETTING], post_time.strftime("%H:%M"))
        self.overridden = bool(stored)
        if (channels, post_time) == (self.config.channels, self.config.post_time):
            return False
        self.config = replace(self.config, channels=channels, post_time=post_time)
        logger.info(
            "term of the day: now in %s at %s (%s)", ", ".join(channels) or "no channel",
            post_time.strftime("%H:%M"), "set in the Home tab" if stored else "from the environment",
        )
        self.apply_schedule()
        return True

    def refresh_settings_or_warn(self) -> None:
        """`refresh_settings` for the scheduler: a database outage is a warning, retried next time."""
        try:
            self.refresh_settings()
        except Exception as error:
            logger.warning("term of the day: could not read the stored settings (retrying in %.0f s): %s",
                           SETTINGS_REFRESH_INTERVAL.total_seconds(), error)

    def change_settings(
        self, *, channels: Sequence[str] | None = None, post_time: time | None = None, by: str | None = None
    ) -> None:
        """Store an admin's channels and/or time; they apply on this instance at once."""
        if self.stored_settings is None:
            raise RuntimeError("this term-of-the-day service has no settings store")
        if channels is not None:
            self.stored_settings.set(CHANNELS_SETTING, ",".join(channels), by)
        if post_time is not None:
            self.stored_settings.set(TIME_SETTING, post_time.strftime("%H:%M"), by)
        self.refresh_settings()

    def reset_settings(self, by: str | None = None) -> None:
        """Back to TERM_OF_DAY_CHANNELS and TERM_OF_DAY_TIME."""
        if self.stored_settings is not None:
            self.stored_settings.reset((CHANNELS_SETTING, TIME_SETTING))
            logger.info("term of the day: settings reset to the environment's by %s", by)
        self.refresh_settings()

    def apply_schedule(self) -> bool:
        """(Re)schedule the daily post at the current time, with a catch-up run now (a post that is
        already due, e.g. for a channel just added after the post time, goes out at once; claims
        keep it to one per channel and day). Without channels the daily job is removed."""
        scheduler = self._scheduler
        if scheduler is None:
            return False
        config = self.config
        if not config.channels:
            scheduler.remove_job(TERM_OF_DAY_JOB_ID)
            logger.info("term of the day: no channel set (TERM_OF_DAY_CHANNELS or the Home tab); not scheduling it")
            return False
        # The job checks the window itself, so APScheduler's misfire grace only has to be as wide.
        scheduler.add_daily_job(TERM_OF_DAY_JOB_ID, self.run_due, at=config.post_time, misfire_grace=config.catch_up_grace)
        scheduler.add_startup_job(TERM_OF_DAY_CATCH_UP_JOB_ID, self.run_due)
        return True

    # ------------------------------------------------------------------ clock and calendar

    def current_time(self) -> datetime:
        now = self.now() if self.now is not None else datetime.now(self.config.tz)
        if now.tzinfo is None:
            raise ValueError("the term-of-the-day clock must return timezone-aware datetimes")
        return now.astimezone(self.config.tz)

    def is_posting_day(self, day: date) -> bool:
        return is_business_day(
            day, include_weekends=self.config.include_weekends, include_holidays=self.config.include_holidays
        )

    def post_time_on(self, day: date) -> datetime:
        return datetime.combine(day, self.config.post_time, tzinfo=self.config.tz)

    def due_day(self, now: datetime | None = None) -> date | None:
        """Today's date when a post is due now (a posting day, inside the window), else None."""
        now = (now or self.current_time()).astimezone(self.config.tz)
        day = now.date()
        if not self.is_posting_day(day):
            return None
        start = self.post_time_on(day)
        return day if start <= now < start + self.config.catch_up_grace else None

    # ------------------------------------------------------------------ jobs

    def run_due(self) -> list[PostOutcome]:
        """The scheduled job (and the startup catch-up): post in every channel if today's post is due."""
        now = self.current_time()
        day = self.due_day(now)
        if day is None:
            logger.info("term of the day: nothing due at %s", now.isoformat(timespec="minutes"))
            return []
        return self.post_all(day)

    def post_today(self) -> list[PostOutcome]:
        """Post today's term now, whatever the time of day (CLI); still only on posting days."""
        day = self.current_time().date()
        if not self.is_posting_day(day):
            logger.info("term of the day: %s is not a posting day (%s)", day, holiday_name(day) or "weekend")
            return [PostOutcome(channel, day, "skipped", reason="not a posting day") for channel in self.config.channels]
        return self.post_all(day)

    def post_all(self, day: date) -> list[PostOutcome]:
        outcomes = []
        for channel in self.config.channels:
            try:
                outcomes.append(self.post_in_channel(channel, day))
            except Exception as error:  # one channel's trouble must not stop the others
                logger.exception("term of the day: posting in %s on %s failed", channel, day)
                outcomes.append(PostOutcome(channel, day, "failed", reason=repr(error)))
            metrics.term_of_day_post(outcomes[-1].status)
        return outcomes

    def choose_term(self, channel_id: str, day: date) -> Term:
        history = self.posts.channel_history(channel_id, before=day)
        return choose_next_term(self.terms, history, day, pinned=self.posts.pinned_term(day))

    def post_in_channel(self, channel_id: str, day: date) -> PostOutcome:
        if day != self.current_time().date():
            # The claim is for a date; posting another day's term would be "yesterday's term today".
            raise ValueError(f"refusing to post the term of {day} on {self.current_time().date()}")
        # Before the claim: a claim that can never be filled would block the day until it is stale.
        self._require_engine()
        term = self.choose_term(channel_id, day)
        now = self.current_time()
        claim = self.posts.claim(
            channel_id,
            day,
            term=term.term,
            term_key=term.key,
            category=term.category,
            claimed_by=self.instance_id,
            now=now,
            stale_before=now - self.config.stale_after,
            owner_is_gone=owner_is_gone,
        )
        if claim is None:
            existing = self.posts.get(channel_id, day)
            logger.info(
                "term of the day: %s on %s already %s by %s; not posting",
                channel_id, day, existing.status if existing else "claimed", existing.claimed_by if existing else "?",
            )
            return PostOutcome(channel_id, day, "skipped", term=existing.term if existing else None, reason="claimed")
        if claim.taken_over:
            logger.warning("term of the day: took over a stale claim for %s on %s", channel_id, day)
            found = self._find_existing_post(claim)
            if found is not None:
                return found
        # A taken-over claim keeps the term its first owner chose.
        term = self._term_of(claim.post)
        explanation, error = self.generate_explanation(term)
        return self._post(claim, term, explanation, error)

    # ------------------------------------------------------------------ generation

    def _require_engine(self) -> GenerationEngine:
        if self.engine is None:
            raise RuntimeError("this term-of-the-day service has no engine: it can only plan, not post")
        return self.engine

    def generate_explanation(self, term: Term) -> tuple[str, str | None]:
        """(explanation, None) or, after the bounded retries, (fallback text, why it failed)."""
        # Outside the retries: a missing engine is a wiring mistake, not a failed generation.
        engine = self._require_engine()
        instruction = definition_instruction(term.term)
        last_error = "no attempt made"
        attempts = max(1, self.config.generation_attempts)
        for attempt in range(1, attempts + 1):
            try:
                answer = answer_question(engine, [], instruction, self.sampling, self.max_prompt_tokens)
                if answer.strip():
                    return answer, None
                last_error = "the model returned an empty answer"
            except Exception as error:
                last_error = f"{type(error).__name__}: {error}"
            logger.warning(
                "term of the day: generating %r failed (attempt %d/%d): %s", term.term, attempt, attempts, last_error
            )
            if attempt < attempts and self.config.retry_delay > timedelta(0):
                self.sleep(self.config.retry_delay.total_seconds())
        logger.error("term of the day: posting %r with the fallback text; last error: %s", term.term, last_error)
        fallback = messages_ko.TERM_OF_DAY_FALLBACK.format(question=term_question(term.term))
        return fallback, f"generation failed after {attempts} attempt(s): {last_error}"

    # ------------------------------------------------------------------ posting

    def _term_of(self, post: StoredTermPost) -> Term:
        found = find_term(self.terms, post.term)
        if found is not None and found.key == normalize_term_key(post.term_key):
            return found
        return Term(term=post.term, category=post.category or "기타", english=None)

    def _post(self, claim: Claim, term: Term, explanation: str, error: str | None) -> PostOutcome:
        post = claim.post
        if not self.posts.confirm_claim(post.id, self.instance_id, self.current_time()):
            logger.warning(
                "term of the day: our claim for %s on %s was taken over while generating; not posting",
                post.channel_id, post.post_date,
            )
            return PostOutcome(post.channel_id, post.post_date, "skipped", term=term.term, reason="claim lost")
        text, blocks = build_post(term, explanation, post.post_date)
        try:
            response = self.client.chat_postMessage(
                channel=post.channel_id,
                text=text,
                blocks=blocks,
                unfurl_links=False,
                unfurl_media=False,
                metadata={
                    "event_type": METADATA_EVENT_TYPE,
                    "event_payload": {"post_date": post.post_date.isoformat(), "term": term.term},
                },
            )
            slack_ts = str(response["ts"])
        except Exception as slack_error:
            reason = f"Slack post failed: {type(slack_error).__name__}: {slack_error}"
            logger.error("term of the day: %s in %s on %s", reason, post.channel_id, post.post_date)
            self.posts.mark_failed(post.id, self.instance_id, reason, explanation=explanation)
            return PostOutcome(post.channel_id, post.post_date, "failed", term=term.term, reason=reason)
        self.posts.mark_posted(
            post.id, self.instance_id, slack_ts=slack_ts, explanation=explanation, now=self.current_time(), error=error
        )
        logger.info(
            "term of the day: posted %r in %s on %s (ts %s%s)",
            term.term, post.channel_id, post.post_date, slack_ts, ", fallback text" if error else "",
        )
        self._start_conversation(post.channel_id, slack_ts, term, explanation)
        status = "fallback" if error else "posted"
        return PostOutcome(post.channel_id, post.post_date, status, term=term.term, slack_ts=slack_ts, reason=error)

    def team_id(self) -> str:
        if self._team_id is None:
            self._team_id = str(self.client.auth_test()["team_id"])
        return self._team_id

    def _start_conversation(self, channel_id: str, slack_ts: str, term: Term, explanation: str) -> None:
        """The post's thread becomes a conversation whose first turn is the term and its explanation."""
        try:
            # The question has no Slack message of its own (no user, no ts) and no event to claim.
            stored = self.conversations.store_question(
                self.team_id(), channel_id, slack_ts, term_question(term.term), None, None
            )
            if stored is not None:
                conversation_id, question_id = stored
                self.conversations.add_assistant_message(conversation_id, explanation, question_id, slack_ts)
        except Exception:
            # The post is out and recorded; only thread follow-ups lose their context.
            logger.exception("term of the day: storing the thread of %s in %s failed", slack_ts, channel_id)

    def _find_existing_post(self, claim: Claim) -> PostOutcome | None:
        """After taking over a stale claim: did the crashed owner post before it died?

        Returns an outcome when it did (recorded as posted) or when that can't be checked (recorded
        as failed: not posting is the only way to be sure of never posting twice); None when the
        channel has no post for the day and posting is safe.
        """
        post = claim.post
        oldest = datetime.combine(post.post_date, time(0), tzinfo=self.config.tz).timestamp()
        try:
            cursor: str | None = None
            while True:
                response = self.client.conversations_history(
                    channel=post.channel_id, oldest=f"{oldest:.6f}", include_all_metadata=True, limit=200, cursor=cursor
                )
                for message in response.get("messages") or []:
                    metadata = message.get("metadata") or {}
                    payload = metadata.get("event_payload") or {}
                    if (
                        metadata.get("event_type") == METADATA_EVENT_TYPE
                        and payload.get("post_date") == post.post_date.isoformat()
                    ):
                        ts = str(message["ts"])
                        logger.warning(
                            "term of the day: the crashed owner had already posted %s in %s; recording it",
                            ts, post.channel_id,
                        )
                        self.posts.mark_posted(
                            post.id, self.instance_id, slack_ts=ts, explanation=post.explanation or "",
                            now=self.current_time(), error="recovered from a stale claim",
                        )
                        return PostOutcome(post.channel_id, post.post_date, "skipped", term=post.term, slack_ts=ts,
                                           reason="already posted by a crashed instance")
                cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
                if not cursor:
                    return None
        except Exception as error:
            reason = f"could not check the channel for an earlier post: {type(error).__name__}: {error}"
            logger.error("term of the day: %s (%s on %s); not posting", reason, post.channel_id, post.post_date)
            self.posts.mark_failed(post.id, self.instance_id, reason)
            return PostOutcome(post.channel_id, post.post_date, "failed", term=post.term, reason=reason)

    # ------------------------------------------------------------------ /용어 오늘

    def today_message(self, channel_id: str | None = None) -> TodayMessage:
        """Today's term for anyone who missed it: this channel's post, else any channel's post today."""
        day = self.current_time().date()
        posted = [p for p in self.posts.posts_on(day) if p.status == "posted"]
        mine = [p for p in posted if p.channel_id == channel_id]
        chosen = (mine or posted or [None])[0]
        if chosen is not None:
            text, blocks = build_post(self._term_of(chosen), chosen.explanation or "", day)
            return TodayMessage(text=text, blocks=blocks)
        if not self.is_posting_day(day):
            next_day = korean_date(
                next_business_day(
                    day, include_weekends=self.config.include_weekends, include_holidays=self.config.include_holidays
                )
            )
            name = holiday_name(day)
            if name is None:
                return TodayMessage(text=messages_ko.TERM_OF_DAY_WEEKEND.format(next_day=next_day))
            return TodayMessage(
                text=messages_ko.TERM_OF_DAY_HOLIDAY.format(holiday=with_particle(name, "이라", "라"), next_day=next_day)
            )
        if not self.config.channels:
            return TodayMessage(text=messages_ko.TERM_OF_DAY_NOT_CONFIGURED)
        return TodayMessage(text=messages_ko.TERM_OF_DAY_NOT_YET.format(time=self.config.post_time.strftime("%H:%M")))


def today_term_message(service: TermOfDayService, channel_id: str | None = None) -> dict[str, Any]:
    """`/용어 오늘`: the Slack payload ({"text", "blocks"?}) showing today's term or why there is none."""
    return service.today_message(channel_id).as_payload()


def schedule_term_of_day(scheduler: FinbotScheduler, service: TermOfDayService) -> bool:
    """Add the daily job and the startup catch-up; False (nothing scheduled) without channels.

    With a settings store, the admins' stored channels and time apply from the start and are
    re-read every SETTINGS_REFRESH_INTERVAL, so a change made through another instance reaches
    this one's schedule too.
    """
    if service.stored_settings is not None:
        service.refresh_settings_or_warn()  # before the scheduler is attached: jobs are added once, below
        scheduler.add_interval_job(
            TERM_OF_DAY_SETTINGS_JOB_ID, service.refresh_settings_or_warn, every=SETTINGS_REFRESH_INTERVAL
        )
    service._scheduler = scheduler
    return service.apply_schedule()


def register_today_subcommand(service: TermOfDayService) -> None:
    """`/용어 오늘` (through the slash command's subcommand registry): today's term, only to the asker."""
    from bot.listeners.slash import SlashRequest, register_subcommand

    def today(request: SlashRequest) -> None:
        try:
            payload = today_term_message(service, request.channel_id)
        except Exception:
            logger.exception("term of the day: /%s 오늘 failed", request.command)
            payload = {"text": messages_ko.TERM_OF_DAY_LOOKUP_FAILED}
        request.respond(**payload, response_type="ephemeral")

    register_subcommand(TODAY_SUBCOMMAND, today)
