"""All of finbot's configuration, read from the environment and `.env` (see `.env.example`)."""

from __future__ import annotations

import re
from datetime import time
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llm.engine import EngineChoice, SamplingParams

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _id_list(value: str) -> tuple[str, ...]:
    """The ids of a comma-separated setting, in order; blanks (e.g. a trailing comma) are skipped."""
    return tuple(item for item in (part.strip() for part in value.split(",")) if item)


class FinbotSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Slack
    slack_bot_token: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_api_url: str = "https://slack.com/api/"
    slack_mode: Literal["socket", "http"] = "socket"
    http_host: str = "0.0.0.0"
    http_port: int = Field(3000, ge=1, le=65535)
    # `finbot run` checks the tokens with Slack before loading the model; while Slack cannot be
    # reached it retries with backoff (saying so) for this many seconds, then gives up.
    slack_startup_timeout_s: float = Field(120, ge=0)

    # Storage
    database_url: str = "sqlite:///finbot.db"

    # Model
    base_model: str = "davidkim205/komt-mistral-7b-v1"
    adapter: str = "SGEcon/komt-mistral-7b-v1_fin_v5"
    engine: EngineChoice = "auto"
    device: str = "auto"
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    max_new_tokens: int = Field(256, ge=1)
    # Older turns of a thread are dropped, oldest first, to keep the prompt within this budget.
    # Prompt plus answer must fit ENGINE_MAX_SEQ_LEN (checked at start-up).
    max_prompt_tokens: int = Field(1792, ge=64)
    # fast / nf4 / low-memory engines: requests decoded together (0 = the mode's default: 16 fast and
    # nf4, 2 low-memory), tokens per request (sizes the KV cache: 128 KiB per token slot for Mistral-7B),
    # requests waiting for a slot before users are told to retry, CUDA graphs and kernel fusion.
    engine_max_batch: int = Field(0, ge=0)
    engine_max_seq_len: int = Field(2048, ge=128)
    engine_max_queue: int = Field(32, ge=1)
    engine_cuda_graphs: bool = True
    engine_compile_kernels: bool = True
    # fast: a block-allocated KV cache shared by all requests instead of a static one per slot
    # (peak 15.9 GB instead of 19.2 GB on Mistral-7B); ENGINE_KV_CACHE_TOKENS sizes it (0 = 9,728).
    # nf4 always pages its KV cache, sized the same way.
    engine_paged_kv: bool = True
    engine_kv_cache_tokens: int = Field(0, ge=0)
    # nf4: the kernel tuner's choice, kept for the next start on the same GPU and finbot version (which
    # then checks it instead of timing every layout: ~25 s less on an H200); empty: tune at every start.
    engine_tuning_cache: str = "~/.cache/finbot/nf4-tuning.json"
    # Questions answered at the same time; the engine batches or serialises them.
    generation_workers: int = Field(4, ge=1)
    # An answer still generating after this many seconds is stopped and the user gets an apology.
    generation_timeout_s: float = Field(120, gt=0)
    # The fake engine answers without a model: for load tests and for trying the Slack side without a GPU.
    fake_reply: str = "테스트 답변입니다. 질문: {question} (이전 대화 {history_turns}개)"
    fake_tokens_per_second: float = Field(0, ge=0)
    # Fault tests: questions containing these texts fail in the fake engine like a GPU does,
    # ";"-separated KIND:TEXT rules, KIND oom (out of memory) or cuda (see llm/fault_injection.py).
    fake_fail_on: str = ""

    @field_validator("fake_fail_on")
    @classmethod
    def _fail_on_rules_parse(cls, value: str) -> str:
        from llm.fault_injection import parse_fail_on

        parse_fail_on(value)  # a rule without text is refused at start-up, not at the first question
        return value

    # Behaviour
    timezone: str = "Asia/Seoul"
    log_level: str = "INFO"

    # Slack experience
    # Native streaming (chat.startStream…); a workspace that refuses it gets chat.update edits instead.
    slack_native_streaming: bool = True
    # Streamed text is sent in batches: at most every this many seconds, or sooner after this many characters.
    stream_flush_seconds: float = Field(0.7, gt=0)
    stream_flush_chars: int = Field(300, ge=1)
    # Longer answers are split into several messages at paragraph or sentence boundaries.
    slack_message_max_chars: int = Field(3000, ge=100, le=3000)
    # The term lookup slash command, as registered in the Slack app (see slack-app-manifest.yaml).
    slash_command: str = Field("/term", pattern=r"^/\S{1,31}$")
    # channel: lookups are posted for everyone in the channel; ephemeral: only the caller sees them.
    term_lookup_visibility: Literal["channel", "ephemeral"] = "channel"
    # A stored term explanation is reused this long before it is generated again (0 = forever).
    term_lookup_max_age_hours: float = Field(24 * 30, ge=0)
    # Q&A channels: top-level questions are answered without a mention (comma-separated ids;
    # more can be added in Slack with the slash command).
    qa_channels: str = ""
    # Questions per user and per channel within the window (0 = unlimited).
    rate_limit_per_user: int = Field(10, ge=0)
    rate_limit_per_channel: int = Field(30, ge=0)
    rate_limit_window_s: float = Field(60, gt=0)
    # Answer messages from other bots (never its own).
    answer_other_bots: bool = False

    @field_validator("slack_bot_token", "slack_app_token", "slack_signing_secret", "openai_api_key", mode="before")
    @classmethod
    def _blank_secret_is_unset(cls, value: object) -> object:
        # `.env.example` leaves them as `KEY=`; an empty token is a missing token, not a valid one.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("timezone")
    @classmethod
    def _known_time_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not a time zone name; use an IANA name such as Asia/Seoul or UTC") from None
        return value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        if value.strip().upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.strip().upper()

    @field_validator("engine_tuning_cache")
    @classmethod
    def _tuning_cache_is_a_file(cls, value: str) -> str:
        if value.strip() and Path(value.strip()).expanduser().is_dir():
            raise ValueError("is a directory: give a file path such as ~/.cache/finbot/nf4-tuning.json, "
                             "or leave it empty to time the kernels at every start")
        return value.strip()

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value.strip()):
            raise ValueError("must be auto, cpu, cuda or cuda:N (e.g. cuda:1)")
        return value.strip()

    @field_validator("database_url")
    @classmethod
    def _database_url_parses(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(
                "not a database URL; use sqlite:///finbot.db or postgresql+psycopg://user:password@host/finbot"
            ) from None
        # From the scheme's text: asking SQLAlchemy for the driver would import it, or fail on a typo.
        backend, _, driver = url.drivername.partition("+")
        if backend == "postgres":
            raise ValueError("the scheme is postgresql+psycopg://, not postgres://") from None
        if backend == "postgresql" and driver not in ("", "psycopg"):
            raise ValueError(
                f"finbot ships the psycopg driver; write postgresql+psycopg:// instead of {url.drivername}://"
            )
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"{backend} is not supported; use sqlite:///… or postgresql+psycopg://…")
        return value

    @field_validator("slack_api_url", "openai_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be a URL starting with http:// or https://")
        return value.strip()

    @field_validator("term_of_day_channels", "qa_channels", "allowed_channel_ids", "allowed_team_ids", "admin_user_ids")
    @classmethod
    def _slack_ids(cls, value: str) -> str:
        for item in _id_list(value):
            if item.startswith("#"):
                raise ValueError(
                    f"{item} is a channel name; use the channel ID (C…), shown at the bottom of the channel's details"
                )
            if not re.fullmatch(r"[A-Z0-9]+", item):
                raise ValueError(f"{item!r} is not a Slack ID (capital letters and digits, e.g. C0123ABCD)")
        return value

    def missing_slack_settings(self) -> list[str]:
        """What `finbot run` needs and lacks, checked before minutes are spent loading the model."""
        missing = [] if self.slack_bot_token else ["SLACK_BOT_TOKEN"]
        if self.slack_mode == "socket" and not self.slack_app_token:
            missing.append("SLACK_APP_TOKEN (Socket Mode)")
        if self.slack_mode == "http" and not self.slack_signing_secret:
            missing.append("SLACK_SIGNING_SECRET (HTTP mode)")
        return missing

    @model_validator(mode="after")
    def _prompt_and_answer_fit_the_engine(self) -> FinbotSettings:
        if self.max_prompt_tokens + self.max_new_tokens > self.engine_max_seq_len:
            raise ValueError(
                f"MAX_PROMPT_TOKENS ({self.max_prompt_tokens}) + MAX_NEW_TOKENS ({self.max_new_tokens}) "
                f"must not exceed ENGINE_MAX_SEQ_LEN ({self.engine_max_seq_len})"
            )
        return self

    @model_validator(mode="after")
    def _transformers_serve_takes_text(self) -> FinbotSettings:
        if self.openai_server == "transformers" and self.openai_prompt_format != "text":
            raise ValueError(
                f"OPENAI_PROMPT_FORMAT={self.openai_prompt_format} does not work with OPENAI_SERVER=transformers: "
                "`transformers serve` takes text prompts only; set OPENAI_PROMPT_FORMAT=text"
            )
        return self

    def qa_channel_ids(self) -> frozenset[str]:
        return frozenset(_id_list(self.qa_channels))

    # Term of the day (오늘의 금융용어); nothing is scheduled while no channel is set.
    # Channel ids, comma-separated (e.g. "C0123,C0456").
    term_of_day_channels: str = ""
    # Local time (TIMEZONE) of the daily post, HH:MM.
    term_of_day_time: str = Field("09:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    term_of_day_include_weekends: bool = False
    term_of_day_include_holidays: bool = False
    # A bot that was down at the post time still posts when it starts within this many minutes (same day only).
    term_of_day_grace_minutes: int = Field(360, ge=1, le=24 * 60)
    # A claim left unfinished this long by a crashed instance may be taken over (after checking Slack).
    term_of_day_stale_claim_minutes: int = Field(30, ge=5)
    term_of_day_generation_attempts: int = Field(3, ge=1, le=10)

    def term_of_day_channel_ids(self) -> tuple[str, ...]:
        return _id_list(self.term_of_day_channels)

    def term_of_day_post_time(self) -> time:
        hour, minute = self.term_of_day_time.split(":")
        return time(int(hour), int(minute))

    # Reliability and scale-out
    # ENGINE=openai: an OpenAI-compatible completions server (e.g. vLLM), URL up to and including /v1.
    openai_base_url: str = "http://localhost:8000/v1"
    openai_model: str = "finbot"
    openai_api_key: SecretStr | None = None
    # Seconds for one whole answer (also the longest silence between streamed chunks).
    openai_timeout_s: float = Field(120, gt=0)
    # ids: the exact prompt token ids (vLLM); text: the decoded [INST]…[/INST] prompt, for servers that only take text.
    openai_prompt_format: Literal["ids", "text"] = "ids"
    openai_stream: bool = True
    # vllm (and servers that take vLLM's extra sampling fields) or transformers (`transformers serve`).
    openai_server: Literal["vllm", "transformers"] = "vllm"
    # An instance owns the questions it answers for this long, renewing every third of it; a killed
    # instance's questions are taken over by a live one (or by itself after a restart) once it runs out.
    question_lease_s: float = Field(30, ge=3, le=600)
    # Questions a fault left unanswered are answered again if younger than this; older ones get an apology.
    recovery_max_age_minutes: int = Field(30, ge=0)
    # A question taken over more often than this (it stops every instance answering it) gets an apology.
    recovery_max_attempts: int = Field(3, ge=1, le=20)
    # Unfinished questions stored by a finbot without leases (before 0003) are presumed owned by a live
    # old instance for this long.
    recovery_min_age_s: float = Field(120, ge=0)
    # On SIGTERM: stop taking events, then wait at most this long for answers in flight; answers still
    # running are interrupted and continued by the next instance (keep it under the orchestrator's grace).
    shutdown_deadline_s: float = Field(20, ge=0)
    # Conversations untouched this long are purged daily (0 = keep forever); Slack event ids kept this many days.
    retention_days: int = Field(90, ge=0)
    processed_event_retention_days: int = Field(7, ge=1)
    # Optional allow-lists (comma-separated ids); empty = every workspace / channel the app is in.
    allowed_team_ids: str = ""
    allowed_channel_ids: str = ""

    def openai_engine_config(self):  # noqa: ANN201 - llm.openai_engine.OpenAIEngineConfig
        from llm.openai_engine import OpenAIEngineConfig

        return OpenAIEngineConfig(
            base_url=self.openai_base_url,
            model=self.openai_model,
            api_key=self.openai_api_key.get_secret_value() if self.openai_api_key else None,
            timeout_s=self.openai_timeout_s,
            prompt_format=self.openai_prompt_format,
            stream=self.openai_stream,
            server=self.openai_server,
        )

    def allowed_team_id_set(self) -> frozenset[str]:
        return frozenset(_id_list(self.allowed_team_ids))

    def allowed_channel_id_set(self) -> frozenset[str]:
        return frozenset(_id_list(self.allowed_channel_ids))

    # Operations: Prometheus metrics, /healthz and /readyz on this port (0 = off), in both Slack modes.
    metrics_port: int = Field(9400, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    # People who see the admin part of the Home tab and may use its controls (comma-separated user ids).
    admin_user_ids: str = ""

    def admin_user_id_set(self) -> frozenset[str]:
        return frozenset(_id_list(self.admin_user_ids))

    def tuning_cache_path(self) -> Path | None:
        return Path(self.engine_tuning_cache).expanduser() if self.engine_tuning_cache else None

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )
