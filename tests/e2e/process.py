"""Running the real `finbot` command in a child process, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def finbot_env(**settings: str) -> dict[str, str]:
    """A clean environment: only the settings a test gives, never the developer's own .env or tokens."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLACK_", "DATABASE_", "ENGINE", "BASE_MODEL", "ADAPTER", "FAKE_"))
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
