"""All of finbot's configuration, read from the environment and `.env` (see `.env.example`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from llm.engine import EngineChoice, SamplingParams


class FinbotSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Slack
    slack_bot_token: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_api_url: str = "https://slack.com/api/"
    slack_mode: Literal["socket", "http"] = "socket"
    http_host: str = "0.0.0.0"
    http_port: int = 3000

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
    max_prompt_tokens: int = Field(3072, ge=64)
    # Questions answered at the same time; the engine batches or serialises them.
    generation_workers: int = Field(4, ge=1)
    # The fake engine answers without a model: for load tests and for trying the Slack side without a GPU.
    fake_reply: str = "테스트 답변입니다. 질문: {question} (이전 대화 {history_turns}개)"
    fake_tokens_per_second: float = Field(0, ge=0)

    # Behaviour
    timezone: str = "Asia/Seoul"
    log_level: str = "INFO"

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )
