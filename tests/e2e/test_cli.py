"""`finbot db upgrade` and `finbot ask` as separate processes, the real model path included."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from tests.e2e.process import run_finbot

pytestmark = pytest.mark.e2e


def test_db_upgrade_creates_the_schema(tmp_path):
    database = tmp_path / "finbot.db"
    result = run_finbot("db", "upgrade", cwd=tmp_path, DATABASE_URL=f"sqlite:///{database}")
    assert result.returncode == 0, result.stderr
    tables = {row[0] for row in sqlite3.connect(database).execute("select name from sqlite_master where type='table'")}
    assert {"conversations", "messages", "processed_events", "alembic_version"} <= tables


def test_ask_answers_through_the_seed_4bit_path_on_the_tiny_model(tmp_path, tiny_checkpoint):
    result = run_finbot(
        "ask",
        "중앙은행의 역할에 대해서 설명해줄래?",
        cwd=tmp_path,
        ENGINE="reference",
        BASE_MODEL=str(tiny_checkpoint.base_dir),
        ADAPTER=str(tiny_checkpoint.adapter_dir),
        MAX_NEW_TOKENS="24",
    )
    assert result.returncode == 0, result.stderr
    answer = result.stdout.strip()
    # A random model says nothing sensible, but the pipeline must print cleaned new text only.
    assert answer
    for leftover in ("[INST]", "[/INST]", "<s>", "</s>", "중앙은행의 역할에 대해서"):
        assert leftover not in answer
    assert "engine reference ready on cpu" in result.stderr


def test_ask_with_an_overlong_question_explains_in_korean(tmp_path, tiny_checkpoint):
    result = run_finbot(
        "ask",
        "금리 " * 200,
        cwd=tmp_path,
        ENGINE="fake",
        BASE_MODEL=str(tiny_checkpoint.base_dir),
        MAX_PROMPT_TOKENS="64",
    )
    assert result.returncode == 2
    assert "질문이 너무 길어서" in result.stderr


def test_run_without_slack_tokens_says_what_is_missing_before_loading_a_model(tmp_path):
    (tmp_path / ".env").write_text("SLACK_BOT_TOKEN=\nSLACK_APP_TOKEN=\n")  # as copied from .env.example
    result = run_finbot("run", cwd=tmp_path, timeout=60, DATABASE_URL=f"sqlite:///{tmp_path / 'finbot.db'}")
    assert result.returncode == 2
    assert "cannot start: SLACK_BOT_TOKEN, SLACK_APP_TOKEN (Socket Mode) not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_that_cannot_be_loaded_is_reported_without_a_traceback(tmp_path):
    result = run_finbot(
        "run", cwd=tmp_path, timeout=120,
        SLACK_BOT_TOKEN="xoxb-test", SLACK_APP_TOKEN="xapp-test", DATABASE_URL=f"sqlite:///{tmp_path / 'finbot.db'}",
        ENGINE="reference", BASE_MODEL=str(tmp_path / "no-such-model"), ADAPTER=str(tmp_path / "no-such-adapter"),
    )
    assert result.returncode == 1
    assert "could not load the model (ENGINE=reference" in result.stderr
    assert "Traceback" not in result.stderr
    assert "xoxb-test" not in result.stderr


def test_term_today_dry_run_shows_the_choice_without_a_model_or_slack(tmp_path):
    settings = dict(
        DATABASE_URL=f"sqlite:///{tmp_path / 'finbot.db'}",
        # Loading this would fail: a dry run must not need the model, nor a Slack token.
        ENGINE="reference", BASE_MODEL=str(tmp_path / "no-such-model"), SLACK_BOT_TOKEN="",
        TERM_OF_DAY_CHANNELS="C1,C2", TERM_OF_DAY_INCLUDE_WEEKENDS="true", TERM_OF_DAY_INCLUDE_HOLIDAYS="true",
    )
    today = datetime.now(ZoneInfo("Asia/Seoul")).date().isoformat()
    pinned = run_finbot("term", "pin", today, "기준금리", cwd=tmp_path, **settings)
    assert pinned.returncode == 0, pinned.stderr
    result = run_finbot("term", "today", "--dry-run", cwd=tmp_path, **settings)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{today} C1: would post 기준금리 (통화정책)",
        f"{today} C2: would post 기준금리 (통화정책)",
    ]
    assert "Traceback" not in result.stderr
    # Nothing was claimed: the dry run only looked.
    assert sqlite3.connect(tmp_path / "finbot.db").execute("select count(*) from term_posts").fetchone() == (0,)
