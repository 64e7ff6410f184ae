"""Ordinary mistakes through the real `finbot` command: one clear line each, never a traceback.

Every case runs the real process (tests/e2e/process.py) and must exit non-zero, print no
"Traceback", name the variable or value at fault (and, where there is one, the way out), and do
so quickly: model loading, the hub and Slack all fail fast or within their stated budget. The
cases run in parallel threads; each is a separate finbot process in its own folder (no .env).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llm.synthetic import write_mistral_tokenizer
from tests.e2e.process import finbot_command, finbot_env, run_finbot
from tests.fakes.slack_server import FakeSlack

pytestmark = pytest.mark.e2e

# Nothing listens on these: what an unreachable hub, Slack or inference server looks like.
with socket.socket() as _sock:
    _sock.bind(("127.0.0.1", 0))
    CLOSED_PORT = _sock.getsockname()[1]

# A hub that cannot be reached (the offline switches off, so that finbot really tries), an empty cache.
UNREACHABLE_HUB = {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_ENDPOINT": f"http://127.0.0.1:{CLOSED_PORT}"}


@dataclass(frozen=True)
class Mistake:
    name: str
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    # Every one of these must be in the output (the variable, the value, the way out).
    named: tuple[str, ...] = ()
    # None of these may be (secrets).
    hidden: tuple[str, ...] = ()
    # Generous: the cases run side by side on a shared CPU; sequentially each takes 0.3-4 s.
    max_seconds: float = 30
    max_lines: int = 4


def _cases(slack_ok: dict[str, str], root: Path) -> list[Mistake]:
    """The table; `slack_ok` points at a working fake Slack, `root` holds the files `_make_files` writes."""
    tokenizer_dir, not_a_database, a_file = root / "tokenizer", root / "notes.txt", root / "a-file"
    fake = {"ENGINE": "fake"}
    return [
        # --- settings: the variable, the bad value and what is allowed ---------------------------
        Mistake("unknown engine", ("ask", "기준금리?"), {"ENGINE": "bogus"}, ("ENGINE=bogus", "'fake'", "'reference'")),
        Mistake("negative token limit", ("ask", "기준금리?"), {"MAX_NEW_TOKENS": "-5"}, ("MAX_NEW_TOKENS=-5", "≥ 1")),
        Mistake("temperature not a number", ("ask", "기준금리?"), {"TEMPERATURE": "abc"}, ("TEMPERATURE=abc", "a number")),
        Mistake("top_p above 1", ("ask", "기준금리?"), {"TOP_P": "1.5"}, ("TOP_P=1.5", "≤ 1")),
        Mistake("slack mode", ("run",), {"SLACK_MODE": "websocket"}, ("SLACK_MODE=websocket", "'socket'", "'http'")),
        Mistake("post time", ("term", "today", "--dry-run"), {"TERM_OF_DAY_TIME": "9am"}, ("TERM_OF_DAY_TIME=9am", "HH:MM")),
        Mistake("prompt and answer too long for the engine", ("ask", "기준금리?"), {**fake, "MAX_NEW_TOKENS": "1000"},
                ("MAX_NEW_TOKENS (1000)", "ENGINE_MAX_SEQ_LEN (2048)")),
        Mistake("boolean", ("ask", "기준금리?"), {"ENGINE_CUDA_GRAPHS": "maybe"}, ("ENGINE_CUDA_GRAPHS=maybe", "true or false")),
        Mistake("log level", ("db", "upgrade"), {"LOG_LEVEL": "LOUD"}, ("LOG_LEVEL=LOUD", "INFO")),
        Mistake("time zone", ("term", "history"), {"TIMEZONE": "Mars/Olympus"}, ("TIMEZONE=Mars/Olympus", "Asia/Seoul")),
        Mistake("device", ("ask", "기준금리?"), {"DEVICE": "gpu"}, ("DEVICE=gpu", "cuda:N")),
        Mistake("port", ("run",), {"HTTP_PORT": "99999"}, ("HTTP_PORT=99999", "65535")),
        Mistake("Slack URL", ("run",), {"SLACK_API_URL": "slack.com/api"}, ("SLACK_API_URL=slack.com/api", "https://")),
        Mistake("inference server URL", ("ask", "기준금리?"), {"OPENAI_BASE_URL": "localhost:8000"},
                ("OPENAI_BASE_URL=localhost:8000", "http://")),
        Mistake("channel name instead of its id", ("term", "today", "--dry-run"), {"TERM_OF_DAY_CHANNELS": "#general"},
                ("TERM_OF_DAY_CHANNELS=#general", "channel ID")),
        Mistake("fault rule without text", ("ask", "기준금리?"), {**fake, "FAKE_FAIL_ON": "oom:"}, ("FAKE_FAIL_ON=oom:", "no text")),
        # --- the database ----------------------------------------------------------------------
        Mistake("not a database URL", ("db", "upgrade"), {"DATABASE_URL": "finbot.db"}, ("DATABASE_URL=finbot.db", "sqlite:///")),
        Mistake("old PostgreSQL scheme", ("db", "upgrade"), {"DATABASE_URL": "postgres://finbot:s3cret@db/finbot"},
                ("postgresql+psycopg://",), hidden=("s3cret",)),
        Mistake("database server unreachable", ("db", "upgrade"),
                {"DATABASE_URL": "postgresql+psycopg://finbot:s3cret@db.invalid/finbot"},
                ("DATABASE_URL=postgresql+psycopg://finbot:***@db.invalid/finbot",), hidden=("s3cret",)),
        Mistake("database folder not writable", ("term", "history"), {"DATABASE_URL": "sqlite:////proc/finbot/finbot.db"},
                ("DATABASE_URL=sqlite:////proc/finbot/finbot.db",)),
        Mistake("not a SQLite file", ("db", "upgrade"), {"DATABASE_URL": f"sqlite:///{not_a_database}"},
                (str(not_a_database), "not a SQLite database")),
        Mistake("unknown revision", ("db", "upgrade", "0099"), {}, ("REVISION 0099", "head")),
        # --- Slack at `finbot run`: checked before the model is loaded -----------------------------
        Mistake("no Slack tokens", ("run",), fake, ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN")),
        Mistake("bot token refused", ("run",), {**fake, **slack_ok, "SLACK_BOT_TOKEN": "xoxb-revoked"},
                ("SLACK_BOT_TOKEN", "invalid_auth", "Bot User OAuth Token"), hidden=("xoxb-revoked",)),
        Mistake("app-level token in the bot token's place", ("run",), {**fake, **slack_ok, "SLACK_BOT_TOKEN": "xapp-1-A1"},
                ("SLACK_BOT_TOKEN", "app-level token (xapp-…)"), hidden=("xapp-1-A1",)),
        Mistake("app token refused", ("run",), {**fake, **slack_ok, "SLACK_APP_TOKEN": "xapp-wrong"},
                ("SLACK_APP_TOKEN", "invalid_auth", "connections:write"), hidden=("xapp-wrong",)),
        Mistake("Slack unreachable", ("run",),
                {**fake, **slack_ok, "SLACK_API_URL": f"http://127.0.0.1:{CLOSED_PORT}/api/", "SLACK_STARTUP_TIMEOUT_S": "2"},
                (f"SLACK_API_URL=http://127.0.0.1:{CLOSED_PORT}/api/", "retrying in", "SLACK_STARTUP_TIMEOUT_S"),
                max_lines=6),
        Mistake("HTTP mode without the signing secret", ("run",), {**fake, **slack_ok, "SLACK_MODE": "http"},
                ("SLACK_SIGNING_SECRET",)),
        # --- the model -------------------------------------------------------------------------
        Mistake("hub unreachable", ("ask", "기준금리?"), {"ENGINE": "reference", **UNREACHABLE_HUB, "HF_HOME": str(root / "hf")},
                ("BASE_MODEL=davidkim205/komt-mistral-7b-v1", "unreachable", "HF_HUB_OFFLINE", "ENGINE=fake"), max_seconds=20),
        Mistake("hub unreachable at finbot run", ("run",),
                {"ENGINE": "reference", **slack_ok, **UNREACHABLE_HUB, "HF_HOME": str(root / "hf")},
                ("BASE_MODEL=davidkim205/komt-mistral-7b-v1", "ENGINE=fake"), max_seconds=20),
        Mistake("offline with an empty cache", ("ask", "기준금리?"), {"ENGINE": "reference", "HF_HOME": str(root / "hf")},
                ("BASE_MODEL=davidkim205/komt-mistral-7b-v1", "HF_HUB_OFFLINE", "ENGINE=fake")),
        Mistake("model folder missing", ("ask", "기준금리?"), {"ENGINE": "reference", "BASE_MODEL": "/nonexistent/komt"},
                ("BASE_MODEL=/nonexistent/komt", "no such directory")),
        Mistake("GPU engine on a CPU machine", ("ask", "기준금리?"), {"ENGINE": "fast"}, ("ENGINE=fast", "CUDA", "ENGINE=fake")),
        Mistake("CUDA device on a CPU machine", ("ask", "기준금리?"), {"ENGINE": "reference", "DEVICE": "cuda:0"},
                ("DEVICE=cuda:0", "CUDA")),
        Mistake("inference server missing", ("ask", "기준금리?"),
                {"ENGINE": "openai", "BASE_MODEL": str(tokenizer_dir), "OPENAI_BASE_URL": f"http://127.0.0.1:{CLOSED_PORT}/v1"},
                (f"OPENAI_BASE_URL=http://127.0.0.1:{CLOSED_PORT}/v1", "vllm serve")),
        # --- output folders --------------------------------------------------------------------
        Mistake("export folder not writable", ("export-merged", "/proc/finbot-merged"), {}, ("OUT_DIR /proc/finbot-merged",)),
        Mistake("export folder is a file", ("export-merged", str(a_file)), {}, (f"OUT_DIR {a_file}", "not a folder")),
        Mistake("feedback file in a missing folder", ("feedback", "export", "-o", "/nonexistent-dir/votes.jsonl"), {},
                ("/nonexistent-dir/votes.jsonl", "No such file or directory")),
        # --- arguments -------------------------------------------------------------------------
        Mistake("empty question", ("ask", ""), fake, ('finbot ask "기준금리가 뭐야?"',)),
        Mistake("blank question", ("ask", "   "), fake, ("질문을 함께 적어 주세요",)),
        Mistake("impossible date", ("term", "pin", "2025-13-45", "기준금리"), {}, ("DATE", "'2025-13-45'", "YYYY-MM-DD")),
        Mistake("empty term", ("term", "pin", "2025-03-14", " "), {}, ("TERM", "the term is empty")),
        Mistake("zero limit", ("term", "history", "--limit", "0"), {}, ("--limit", "'0'", "≥ 1")),
        Mistake("limit not a number", ("term", "history", "--limit", "abc"), {}, ("--limit", "'abc'")),
        Mistake("channel name as --channel", ("term", "history", "--channel", "#general"), {}, ("--channel", "'#general'")),
        Mistake("unpin a date without a pin", ("term", "unpin", "2030-01-04"), {}, ("2030-01-04", "고정된 용어가 없어요")),
        Mistake("post without a channel", ("term", "today"), {}, ("TERM_OF_DAY_CHANNELS", "--dry-run")),
        Mistake("unknown command", ("fly",), {}, ("'fly'", "chat")),
        Mistake("term without a subcommand", ("term",), {}, ("required", "pins", "unpin")),
    ]


def _make_files(root: Path) -> None:
    write_mistral_tokenizer(root / "tokenizer")
    (root / "notes.txt").write_text("이건 데이터베이스가 아니에요\n" * 100)
    (root / "a-file").write_text("x")


CASE_NAMES = [case.name for case in _cases({}, Path("/unused"))]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Mistake, subprocess.CompletedProcess[str], float]]:
    root = tmp_path_factory.mktemp("mistakes")
    _make_files(root)
    with FakeSlack() as slack:
        slack_ok = {"SLACK_BOT_TOKEN": slack.bot_token, "SLACK_APP_TOKEN": slack.app_token, "SLACK_API_URL": slack.api_url}
        cases = _cases(slack_ok, root)

        def attempt(case: Mistake) -> tuple[Mistake, subprocess.CompletedProcess[str], float]:
            cwd = root / case.name.replace(" ", "-")
            cwd.mkdir()
            settings = {"DATABASE_URL": f"sqlite:///{cwd / 'finbot.db'}", **case.env}
            started = time.monotonic()
            try:
                result = run_finbot(*case.args, cwd=cwd, timeout=45, **settings)
            except subprocess.TimeoutExpired as hung:  # reported as this case's failure, not the table's
                output = hung.stdout if isinstance(hung.stdout, str) else (hung.stdout or b"").decode(errors="replace")
                errors = hung.stderr if isinstance(hung.stderr, str) else (hung.stderr or b"").decode(errors="replace")
                result = subprocess.CompletedProcess(hung.cmd, 0, output, errors + "\n[still running after 45 s]")
            return case, result, time.monotonic() - started

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(attempt, cases))
    return {case.name: (case, result, seconds) for case, result, seconds in results}


def test_the_table_has_at_least_25_mistakes():
    assert len(CASE_NAMES) >= 25
    assert len(set(CASE_NAMES)) == len(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_mistake_gets_one_clear_line(outcomes, name):
    case, result, seconds = outcomes[name]
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for needed in case.named:
        assert needed in output, f"{needed!r} not named in:\n{output}"
    for secret in case.hidden:
        assert secret not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) <= case.max_lines, output
    assert seconds < case.max_seconds, f"took {seconds:.1f} s:\n{output}"


@pytest.mark.parametrize("sigint_inherited_as", ["default", "ignored"])
def test_ctrl_c_leaves_with_one_line_and_status_130(tmp_path, sigint_inherited_as):
    # "ignored": started the way a script's background job (or some CI runner) starts it, with
    # SIGINT ignored, which Python would otherwise keep: Ctrl-C would do nothing in the chat.
    command = finbot_command("chat")
    if sigint_inherited_as == "ignored":
        command = ["sh", "-c", "trap '' INT; exec \"$@\"", "sh", *command]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=finbot_env(ENGINE="fake", DATABASE_URL=f"sqlite:///{tmp_path / 'f.db'}"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # The banner is the chat waiting for a question.
        assert "finbot 대화" in (process.stdout.readline() if process.stdout else "")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert "Traceback" not in stdout + stderr
    assert stderr.strip().splitlines()[-1] == "finbot: interrupted (Ctrl-C)"
    assert os.path.exists(tmp_path / "f.db")
