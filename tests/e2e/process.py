"""Running the real `finbot` command in a child process, as an operator would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.fakes.slack_server import FakeSlack

REPO_ROOT = Path(__file__).resolve().parents[2]


def finbot_env(**settings: str) -> dict[str, str]:
    """A clean environment: only the settings a test gives, never the developer's own .env or tokens."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLACK_", "DATABASE_", "ENGINE", "BASE_MODEL", "ADAPTER", "FAKE_", "METRICS_"))
        # slack-sdk tunnels through a proxy if one is set, which a local fake Slack cannot answer.
        and key.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # The repository first; anything already on the path (e.g. wheels unpacked elsewhere) after it.
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        # Off unless a test asks for a port: processes of parallel tests would fight over 9400.
        METRICS_PORT="0",
    )
    env.update(settings)
    return env


def finbot_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bot.cli", *args]


def run_finbot(*args: str, cwd: Path, timeout: float = 180, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        finbot_command(*args), cwd=cwd, env=finbot_env(**settings), capture_output=True, text=True, timeout=timeout
    )


def start_finbot(*args: str, cwd: Path, log_path: Path, **settings: str) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen(
        finbot_command(*args), cwd=cwd, env=finbot_env(**settings), stdout=log, stderr=subprocess.STDOUT
    )


def slack_settings(fake: FakeSlack) -> dict[str, str]:
    """The settings that point finbot at a fake Slack server."""
    return {"SLACK_BOT_TOKEN": fake.bot_token, "SLACK_APP_TOKEN": fake.app_token, "SLACK_API_URL": fake.api_url}


@contextmanager
def running_finbot(
    fake: FakeSlack, cwd: Path, log_path: Path | None = None, stop_timeout: float = 30, **settings: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`finbot run` connected in Socket Mode to `fake`; stopped with SIGTERM on exit.

    On the way out it checks what every run must get right whatever the test: a clean exit, no
    traceback, and no Slack token in the operator's log.
    """
    log_path = log_path or cwd / "finbot.log"
    process = start_finbot("run", cwd=cwd, log_path=log_path, **{**slack_settings(fake), **settings})
    try:
        fake.wait_connected(timeout=60)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            exit_code = process.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    output = log_path.read_text(errors="replace")
    assert exit_code == 0, output[-5000:]
    assert "Traceback" not in output, output[-5000:]
    assert fake.bot_token not in output and fake.app_token not in output
