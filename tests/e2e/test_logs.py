"""What an operator reads at LOG_LEVEL=INFO: finbot's own lines, one per step, no library chatter.

Through the real process: `finbot db upgrade`, a whole `finbot run` that answers a mention, and a
model loaded from the local Hugging Face cache while the hub is unreachable (no retry storm).
"""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e.process import run_finbot, running_finbot
from tests.fakes.slack_server import FakeSlack

pytestmark = pytest.mark.e2e

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>[\w.]+) \[[^\]]+\] (?P<message>.*)$")
OWN_LOGGERS = ("finbot", "bot", "llm", "storage")
CHATTER = ("Context impl", "Will assume", "setup plugin", "Running upgrade", "session", "Warning", "deprecat",
           "As you gave", "Retrying", "kernels", "Scheduler started", "Added job")


def log_records(text: str) -> list[re.Match[str]]:
    """The log lines of `text`; anything else on stderr (a progress bar) is skipped."""
    return [match for line in text.splitlines() if (match := LINE.match(line))]


def assert_quiet(text: str) -> None:
    for record in log_records(text):
        assert record["logger"].split(".")[0] in OWN_LOGGERS, record.group(0)
    for chatter in CHATTER:
        assert chatter not in text, f"{chatter!r} in:\n{text}"


def test_db_upgrade_says_where_the_database_is_in_one_line(tmp_path):
    database = f"sqlite:///{tmp_path / 'finbot.db'}"
    first = run_finbot("db", "upgrade", cwd=tmp_path, DATABASE_URL=database, LOG_LEVEL="INFO")
    assert first.returncode == 0, first.stderr
    [line] = first.stderr.splitlines()
    assert re.search(r"INFO finbot .* database migrated from empty to revision \d{4}$", line), line
    again = run_finbot("db", "upgrade", cwd=tmp_path, DATABASE_URL=database, LOG_LEVEL="INFO")
    [line] = again.stderr.splitlines()
    assert re.search(r"database at revision \d{4}$", line), line
    # Quiet because of the level, not because logging is broken: DEBUG shows Alembic's own lines.
    fresh = f"sqlite:///{tmp_path / 'debug.db'}"
    debug = run_finbot("db", "upgrade", cwd=tmp_path, DATABASE_URL=fresh, LOG_LEVEL="DEBUG")
    assert "alembic.runtime.migration" in debug.stderr and "Running upgrade" in debug.stderr


def test_run_logs_one_line_per_lifecycle_step(tmp_path):
    log = tmp_path / "finbot.log"
    with FakeSlack() as fake, running_finbot(
        fake, tmp_path, log, DATABASE_URL=f"sqlite:///{tmp_path / 'finbot.db'}", ENGINE="fake",
        LOG_LEVEL="INFO", TERM_OF_DAY_CHANNELS="C1",
    ):
        mention = fake.mention_event("기준금리가 뭐야?", channel="C1")
        fake.send_event(mention)
        fake.wait_for(lambda: [m for m in fake.messages(channel="C1", thread_ts=mention["ts"]) if m.get("blocks")],
                      timeout=30, description="the answer")
        time.sleep(0.3)
    text = log.read_text()
    assert_quiet(text)
    messages = [record["message"] for record in log_records(text)]
    steps = [
        "Slack: signed in as @finbot in Finbot Test (T0001)",
        "database migrated from empty to revision",
        "loading the model: ENGINE=fake, template answers",
        "engine fake ready on cpu",
        "finbot is ready (Socket Mode, engine fake)",
        "answered question",
        "received SIGTERM, shutting down",
        "finbot stopped",
    ]
    position = 0
    for step in steps:
        found = next((index for index in range(position, len(messages)) if messages[index].startswith(step)), None)
        assert found is not None, f"{step!r} missing or out of order in:\n" + "\n".join(messages)
        position = found + 1
    assert len(messages) <= 20, "\n".join(messages)


def _cache(hf_home, repo: str, files) -> None:  # noqa: ANN001 - paths
    """Lay `files` out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<rev>/}."""
    repo_dir = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    for file in files.iterdir():
        (snapshot / file.name).symlink_to(file)


def test_a_cached_model_loads_at_once_when_the_hub_is_unreachable(tmp_path, tiny_checkpoint):
    hf_home = tmp_path / "hf"
    _cache(hf_home, "org/tiny", tiny_checkpoint.base_dir)
    _cache(hf_home, "org/tiny-lora", tiny_checkpoint.adapter_dir)
    started = time.monotonic()
    result = run_finbot(
        "ask", "기준금리가 뭐야?", cwd=tmp_path, timeout=120, LOG_LEVEL="INFO",
        ENGINE="reference", BASE_MODEL="org/tiny", ADAPTER="org/tiny-lora", MAX_NEW_TOKENS="8",
        HF_HOME=str(hf_home), HF_HUB_OFFLINE="", TRANSFORMERS_OFFLINE="", HF_ENDPOINT="http://127.0.0.1:9",
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert_quiet(result.stderr)
    messages = [record["message"] for record in log_records(result.stderr)]
    assert sum("unreachable" in message for message in messages) == 1, messages
    assert any(m.startswith("loading the model: ENGINE=reference, BASE_MODEL org/tiny (local cache, ") for m in messages), messages
    assert any(m.startswith("engine reference ready on cpu") for m in messages), messages
    # Transformers alone would retry the hub 2 x 5 times (about 50 s) before using the cache.
    assert elapsed < 40, f"took {elapsed:.1f} s:\n{result.stderr}"
