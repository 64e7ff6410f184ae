"""Settings that operators get wrong fail at start-up with a clear message, not mid-conversation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bot.cli import build_engine_from
from bot.settings import FinbotSettings
from llm.engine import SamplingParams


def test_defaults_follow_the_model_card(monkeypatch):
    monkeypatch.chdir("/")  # no developer .env
    settings = FinbotSettings()
    params = settings.sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.9, 0.8, 50, 256)
    assert settings.timezone == "Asia/Seoul"
    assert settings.max_prompt_tokens + settings.max_new_tokens <= settings.engine_max_seq_len


def test_sampling_params_default_to_the_model_card_too(monkeypatch):
    """`SamplingParams()` is used as it is (the term of the day's default, engine benchmarks) and
    must sample like the settings do: the model card's temperature 0.9, top_p 0.8, top_k 50,
    256 new tokens, no fixed seed."""
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.9, 0.8, 50, 256)
    assert params.seed is None and not params.greedy
    for name in ("TEMPERATURE", "TOP_P", "TOP_K", "MAX_NEW_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    assert FinbotSettings(_env_file=None).sampling_params() == params


def test_a_prompt_budget_the_engine_cannot_hold_is_rejected(monkeypatch):
    monkeypatch.setenv("MAX_PROMPT_TOKENS", "3072")
    with pytest.raises(ValidationError, match="ENGINE_MAX_SEQ_LEN"):
        FinbotSettings(_env_file=None)


def test_openai_engine_is_built_from_settings(monkeypatch, tiny_checkpoint):
    from llm.openai_engine import OpenAIEngine

    monkeypatch.setenv("ENGINE", "openai")
    monkeypatch.setenv("BASE_MODEL", str(tiny_checkpoint.base_dir))
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    engine = build_engine_from(FinbotSettings(_env_file=None))
    assert isinstance(engine, OpenAIEngine)
    assert engine.tokenizer.bos_token_id == 1


def test_every_setting_is_documented_in_env_example_with_its_default(monkeypatch):
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / ".env.example"
    documented = {}
    for line in example.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            documented[key] = value
    fields = {name.upper(): field for name, field in FinbotSettings.model_fields.items()}
    assert set(fields) == set(documented)

    # Loading the example as it is must give exactly the defaults (secrets left empty).
    monkeypatch.chdir(example.parent)
    from_example = FinbotSettings(_env_file=example)
    defaults = FinbotSettings(_env_file=None)
    for name in FinbotSettings.model_fields:
        if name.startswith("slack_") and name.endswith(("token", "secret")) or name == "openai_api_key":
            continue
        assert getattr(from_example, name) == getattr(defaults, name), name


def test_the_tuning_cache_is_a_file_in_the_users_cache_by_default_and_empty_turns_it_off(monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.delenv("ENGINE_TUNING_CACHE", raising=False)
    assert FinbotSettings(_env_file=None).tuning_cache_path() == Path.home() / ".cache/finbot/nf4-tuning.json"
    monkeypatch.setenv("ENGINE_TUNING_CACHE", "")
    assert FinbotSettings(_env_file=None).tuning_cache_path() is None
    monkeypatch.setenv("ENGINE_TUNING_CACHE", str(tmp_path / "plans.json"))
    assert FinbotSettings(_env_file=None).tuning_cache_path() == tmp_path / "plans.json"


def test_a_directory_as_the_tuning_cache_is_rejected_with_what_to_give_instead(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGINE_TUNING_CACHE", str(tmp_path))
    with pytest.raises(ValidationError, match="is a directory: give a file path"):
        FinbotSettings(_env_file=None)
