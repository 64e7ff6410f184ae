"""The pieces behind `finbot chat`, `finbot doctor` and the one-line mistakes, without a process.

The terminal view is checked through `tests.e2e.terminal.Screen` (what a terminal would show),
the fake engine's tokenizer against transformers' own reading of the same file, settings errors
against the real `FinbotSettings`, and hub decisions against a port where nothing listens.
"""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.chat import TerminalView, cursor_after, for_terminal
from bot.doctor import MANIFEST_BOT_SCOPES, MANIFEST_PATH, manifest_bot_scopes
from bot.errors import describe_settings_error, redact_url
from bot.settings import FinbotSettings
from llm.mistral_tokenizer import BundledMistralTokenizer
from llm.model_files import ModelFilesError, ModelSource, prepare_sources
from llm.prompt import encode_prompt
from tests.e2e.terminal import Screen


def _view(columns: int, start: str = "") -> tuple[TerminalView, io.StringIO]:
    out = io.StringIO()
    out.write(start)
    return TerminalView(out, interactive=True, start_column=len(start), columns=lambda: columns), out


def _shown(out: io.StringIO, columns: int) -> str:
    screen = Screen(columns)
    screen.feed(out.getvalue())
    return screen.text()


def test_hangul_takes_two_columns_and_wraps_whole():
    assert cursor_after("가나다", 10) == (0, 6)
    # Five columns wide: two syllables fit (4 columns), the third does not fit in the last column.
    assert cursor_after("가나다", 5) == (1, 2)
    assert cursor_after("ab\n가", 10) == (1, 2)


@pytest.mark.parametrize("columns", [12, 17, 40])
def test_a_shrinking_answer_is_rewritten_in_place_even_across_wrapped_rows(columns):
    def unwrapped() -> str:
        # Rows joined; a space that fell at a row's end is not visible on a terminal either.
        return _shown(out, columns).replace("\n", "").replace(" ", "")

    view, out = _view(columns, start="finbot> ")
    words = ["기준금리는", "중앙은행이", "정하는", "금리예요.", "물가가", "오르면", "올리고", "경기가"]
    for count in range(1, len(words) + 1):
        view.show(" ".join(words[:count]))
    assert unwrapped() == "finbot>" + "".join(words)
    # The token limit cut the answer: cleaning drops the unfinished last sentence.
    view.finish("기준금리는 중앙은행이 정하는 금리예요.")
    assert unwrapped() == "finbot>기준금리는중앙은행이정하는금리예요."
    assert "물가가" not in _shown(out, columns)


def test_the_placeholder_is_replaced_by_the_answer():
    view, out = _view(60, start="finbot> ")
    view.show("답변을 준비하고 있어요… ⏳")
    view.show("안녕하세요")
    view.finish("안녕하세요. 기준금리는 …")
    assert _shown(out, 60) == "finbot> 안녕하세요. 기준금리는 …"


def test_piped_output_gets_only_the_final_text():
    out = io.StringIO()
    view = TerminalView(out, interactive=False)
    view.show("중간 텍스트")
    view.finish("최종 답변")
    assert out.getvalue() == "최종 답변\n"


def test_escape_sequences_from_the_model_never_reach_the_terminal():
    view, out = _view(40)
    view.finish("금리\x1b[2J\x1b]0;title\x07 인상")
    assert "\x1b[2J" not in out.getvalue() and "\x07" not in out.getvalue()


def test_slack_emoji_codes_become_characters_in_the_terminal():
    assert for_terminal("잠시 후 다시 시도해 주세요. :pray:") == "잠시 후 다시 시도해 주세요. 🙏"
    assert for_terminal("예: `@finbot 기준금리가 뭐야?`") == "예: @finbot 기준금리가 뭐야?"


def test_the_bundled_tokenizer_reads_like_transformers(mistral_tokenizer):
    bundled = BundledMistralTokenizer()
    history = [("기준금리가 뭐야?", "기준금리는 중앙은행이 정하는 정책금리예요. 3.5% ETF </s> <s>")]
    question = "그럼 환율은?\n\n영어로도: exchange rate"
    ids = encode_prompt(bundled, history, question, 512)
    assert ids == encode_prompt(mistral_tokenizer, history, question, 512)
    for skip in (True, False):
        assert bundled.decode(ids, skip_special_tokens=skip) == mistral_tokenizer.decode(ids, skip_special_tokens=skip)
    # User text that looks like a special token stays text.
    assert bundled.eos_token_id not in bundled.encode("</s>", add_special_tokens=False)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MAX_NEW_TOKENS": "-5"}, "MAX_NEW_TOKENS=-5 is invalid: must be ≥ 1"),
        ({"TEMPERATURE": "abc"}, "TEMPERATURE=abc is invalid: must be a number"),
        ({"ENGINE": "bogus"}, "ENGINE=bogus is invalid: must be one of 'auto', 'reference'"),
        ({"ENGINE_PAGED_KV": "maybe"}, "ENGINE_PAGED_KV=maybe is invalid: must be true or false"),
        ({"TERM_OF_DAY_TIME": "9am"}, "TERM_OF_DAY_TIME=9am is invalid: must be HH:MM on a 24-hour clock"),
        ({"TIMEZONE": "Seoul"}, "TIMEZONE=Seoul is invalid: not a time zone name"),
        ({"QA_CHANNELS": "C1,#질문방"}, "QA_CHANNELS=C1,#질문방 is invalid: #질문방 is a channel name"),
        ({"MAX_NEW_TOKENS": "1000"}, "MAX_PROMPT_TOKENS (1792) + MAX_NEW_TOKENS (1000) must not exceed ENGINE_MAX_SEQ_LEN"),
    ],
)
def test_an_invalid_setting_is_named_with_its_value_and_what_is_allowed(monkeypatch, tmp_path, env, expected):
    monkeypatch.chdir(tmp_path)  # no developer .env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as raised:
        FinbotSettings()
    lines = describe_settings_error(raised.value)
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_a_database_password_is_never_repeated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "postgres://finbot:s3cret@db/finbot")
    with pytest.raises(ValidationError) as raised:
        FinbotSettings()
    (line,) = describe_settings_error(raised.value)
    assert "s3cret" not in line and "postgresql+psycopg://" in line
    assert redact_url("postgresql+psycopg://u:p%40ss@h/db") == "postgresql+psycopg://u:***@h/db"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_hub_is_reported_in_seconds_with_the_ways_out(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    sources = [ModelSource("BASE_MODEL", "davidkim205/komt-mistral-7b-v1")]
    with pytest.raises(ModelFilesError) as raised:
        prepare_sources(sources, offline=False, endpoint=endpoint, cache_dir=str(tmp_path))
    message = str(raised.value)
    for needed in ("BASE_MODEL=davidkim205/komt-mistral-7b-v1", "unreachable", "HF_HUB_OFFLINE", "ENGINE=fake"):
        assert needed in message


def test_cached_models_load_from_the_cache_alone_when_the_hub_is_unreachable(tmp_path, tiny_checkpoint):
    from huggingface_hub.constants import REPO_ID_SEPARATOR

    # A cache laid out as huggingface_hub does: models--org--name/{refs/main, snapshots/<sha>/...}.
    repo = tmp_path / f"models{REPO_ID_SEPARATOR}org{REPO_ID_SEPARATOR}tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for file in Path(tiny_checkpoint.base_dir).iterdir():
        (snapshot / file.name).symlink_to(file)
    sources = [ModelSource("BASE_MODEL", "org/tiny")]
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    preparation = prepare_sources(sources, offline=False, endpoint=endpoint, cache_dir=str(tmp_path))
    assert preparation.cache_only
    assert preparation.statuses[0].where == "cached" and preparation.statuses[0].size_bytes > 0


def test_a_missing_local_directory_is_named(tmp_path):
    with pytest.raises(ModelFilesError, match=r"ADAPTER=/nonexistent/lora: no such directory"):
        prepare_sources([ModelSource("ADAPTER", "/nonexistent/lora", "adapter")], offline=True, endpoint="http://x")


def test_the_doctor_checks_the_scopes_the_manifest_asks_for():
    assert MANIFEST_PATH.exists()
    assert manifest_bot_scopes() == MANIFEST_BOT_SCOPES
