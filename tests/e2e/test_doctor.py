"""`finbot doctor` against the project's fake Slack, a real SQLite file and a fake inference server.

Every row the operator reads is checked: what was found and, for a failure, the fix; failures are
injected into the fake Slack (scopes not granted, a channel that does not exist or that finbot is
not in, a refused app-level token, a 503) and the environment (no GPU, no hub, an old database).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llm.synthetic import write_mistral_tokenizer
from tests.e2e.process import run_finbot, slack_settings
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.slack_server import FakeSlack

pytestmark = pytest.mark.e2e


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rows(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str, str]]:
    """{check name: (mark, found, fix)} from the table."""
    table: dict[str, tuple[str, str, str]] = {}
    last = None
    for line in result.stdout.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("→") and last is not None:
            mark, found, _ = table[last]
            table[last] = (mark, found, stripped.removeprefix("→ "))
        elif stripped[:1] in ("✔", "✘", "–"):
            mark, rest = stripped[0], stripped[1:].strip()
            name, _, found = rest.partition("  ")
            table[name.strip()] = (mark, found.strip(), "")
            last = name.strip()
    return table


@pytest.fixture
def slack():
    with FakeSlack() as fake:
        yield fake


def doctor(cwd, **settings: str) -> subprocess.CompletedProcess[str]:
    result = run_finbot("doctor", cwd=cwd, timeout=60, **settings)
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result


def test_a_healthy_deployment_is_all_ticks(tmp_path, slack):
    database = f"sqlite:///{tmp_path / 'finbot.db'}"
    assert run_finbot("db", "upgrade", cwd=tmp_path, DATABASE_URL=database).returncode == 0
    result = doctor(tmp_path, **slack_settings(slack), DATABASE_URL=database, ENGINE="fake",
                    TERM_OF_DAY_CHANNELS="C1", QA_CHANNELS="CQA")
    table = rows(result)
    assert result.returncode == 0, result.stdout
    assert table["settings"][0] == "✔"
    assert table["database"][0] == "✔" and "at the latest revision" in table["database"][1]
    assert table["Slack bot token"] == ("✔", "valid: @finbot in Finbot Test (T0001)", "")
    assert table["Slack scopes"][0] == "✔"
    assert table["Socket Mode"][0] == "✔"
    assert table["channel C1"] == ("✔", "TERM_OF_DAY_CHANNELS: #channel-c1, finbot is a member", "")
    assert table["channel CQA"][0] == "✔"
    for not_needed in ("GPU", "model files", "inference server"):
        assert table[not_needed][0] == "–"
    assert "Everything finbot needs is in place." in result.stdout


def test_every_failure_is_a_cross_with_its_fix_and_the_status_is_1(tmp_path, slack):
    slack.bot_scopes.remove("commands")
    slack.bot_scopes.remove("im:history")

    def channel_info(call):  # noqa: ANN001, ANN202 - fake Slack's override hook
        if call.params.get("channel") == "C404":
            return {"ok": False, "error": "channel_not_found"}
        return {"ok": True, "channel": {"id": call.params["channel"], "name": "질문방", "is_member": False}}

    slack.set_response_override("conversations.info", channel_info)
    result = doctor(
        tmp_path, **{**slack_settings(slack), "SLACK_APP_TOKEN": "xapp-revoked"},
        DATABASE_URL="sqlite:////proc/finbot/finbot.db", ENGINE="fast",
        TERM_OF_DAY_CHANNELS="C404", QA_CHANNELS="CQA",
        HF_HOME=str(tmp_path / "hf"),  # an empty cache, and the offline switch on: no way to the files
    )
    table = rows(result)
    assert result.returncode == 1
    assert table["database"][:2] == ("✘", "sqlite:////proc/finbot/finbot.db: no database yet, and /proc is not writable")
    assert "writable folder" in table["database"][2]
    assert table["Slack bot token"][0] == "✔"
    assert table["Slack scopes"][0] == "✘" and table["Slack scopes"][1] == "missing im:history, commands"
    assert "reinstall the app" in table["Slack scopes"][2]
    assert table["Socket Mode"][:2] == ("✘", "SLACK_APP_TOKEN refused by Slack (invalid_auth)")
    assert "connections:write" in table["Socket Mode"][2]
    assert table["channel C404"][0] == "✘" and "no such channel" in table["channel C404"][1]
    assert table["channel CQA"] == ("✘", "QA_CHANNELS: #질문방 exists, finbot is not a member", "in #질문방: /invite @finbot")
    # This machine has no GPU: a GPU engine is a failure whose fix names the engines that work here.
    assert table["GPU"][0] == "✘" and "ENGINE=fast needs a CUDA GPU" in table["GPU"][1]
    assert "ENGINE=fake" in table["GPU"][2] and "ENGINE=openai" in table["GPU"][2]
    assert table["model BASE_MODEL"][0] == "✘" and "HF_HUB_OFFLINE" in table["model BASE_MODEL"][1]
    assert "BASE_MODEL=/path/to/base" in table["model BASE_MODEL"][2]
    assert table["adapter ADAPTER"][0] == "✘"
    assert "xapp-revoked" not in result.stdout


def test_a_refused_bot_token_and_a_slack_outage(tmp_path, slack):
    refused = rows(doctor(tmp_path, **{**slack_settings(slack), "SLACK_BOT_TOKEN": "xoxp-user-token"}, ENGINE="fake",
                          TERM_OF_DAY_CHANNELS="C1"))
    assert refused["Slack bot token"][:2] == ("✘", "refused by Slack (invalid_auth)")
    assert "user token (xoxp-…)" in refused["Slack bot token"][2]
    assert refused["channels"] == ("–", "not checked: the bot token does not work", "")
    assert refused["Socket Mode"][0] == "✔"  # the app-level token is checked all the same
    slack.fail_next("auth.test", error="service_unavailable", status=503, retry_after=None)
    outage = rows(doctor(tmp_path, **slack_settings(slack), ENGINE="fake"))
    assert outage["Slack bot token"][:2] == ("✘", f"Slack at {slack.api_url} answered HTTP 503 service_unavailable")
    unreachable = rows(doctor(tmp_path, **{**slack_settings(slack), "SLACK_API_URL": f"http://127.0.0.1:{_closed_port()}/api/"},
                              ENGINE="fake"))
    assert unreachable["Slack bot token"][0] == "✘" and "unreachable" in unreachable["Slack bot token"][1]


def test_an_old_database_and_invalid_settings(tmp_path, slack):
    database = f"sqlite:///{tmp_path / 'finbot.db'}"
    fresh = rows(doctor(tmp_path, **slack_settings(slack), DATABASE_URL=database, ENGINE="fake"))
    assert fresh["database"] == ("✔", f"{database}: no database yet; finbot run creates it", "")
    assert not (tmp_path / "finbot.db").exists()  # the doctor only looks
    assert run_finbot("db", "upgrade", "0001", cwd=tmp_path, DATABASE_URL=database).returncode == 0
    old = rows(doctor(tmp_path, **slack_settings(slack), DATABASE_URL=database, ENGINE="fake"))
    assert old["database"][0] == "✘" and "at revision 0001, the latest is" in old["database"][1]
    assert old["database"][2].startswith("finbot db upgrade")
    invalid = doctor(tmp_path, **slack_settings(slack), MAX_NEW_TOKENS="-5")
    assert invalid.returncode == 1
    assert rows(invalid)["settings"][:2] == ("✘", "MAX_NEW_TOKENS=-5 is invalid: must be ≥ 1")


def test_the_openai_engine_needs_its_server_and_the_tokenizer(tmp_path, slack):
    tokenizer = tmp_path / "tokenizer"
    write_mistral_tokenizer(tokenizer)
    settings = {**slack_settings(slack), "ENGINE": "openai", "BASE_MODEL": str(tokenizer), "OPENAI_MODEL": "finbot"}
    with FakeOpenAI() as server:
        up = rows(doctor(tmp_path, **settings, OPENAI_BASE_URL=server.base_url))
        assert server.requests and server.requests[0]["max_tokens"] == 1
    assert up["inference server"][0] == "✔" and "answered" in up["inference server"][1]
    assert up["tokenizer BASE_MODEL"] == ("✔", up["tokenizer BASE_MODEL"][1], "")
    assert "local directory" in up["tokenizer BASE_MODEL"][1]
    assert up["GPU"][0] == "–"
    down_url = f"http://127.0.0.1:{_closed_port()}/v1"
    down = rows(doctor(tmp_path, **settings, OPENAI_BASE_URL=down_url))
    assert down["inference server"][0] == "✘" and down_url in down["inference server"][1]
    assert "vllm serve" in down["inference server"][2]


class _FakeHub(BaseHTTPRequestHandler):
    """The two hub calls the doctor makes: is anyone there (401 without a token), and a model's files."""

    sizes: dict[str, list[tuple[str, int]]] = {}

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(401)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        repo = self.path.split("?")[0].removeprefix("/api/models/")
        if repo not in self.sizes:
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"id": repo, "siblings": [{"rfilename": name, "size": size} for name, size in self.sizes[repo]]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_models_to_download_show_their_size_and_the_free_disk(tmp_path, slack, hub):
    _FakeHub.sizes = {
        # Megabytes, not a real 7B's gigabytes: a CI machine with less than 16 GB free must still pass.
        "org/base": [("config.json", 700), ("model-00001-of-00002.safetensors", 9_900_000),
                     ("model-00002-of-00002.safetensors", 4_600_000), ("pytorch_model.bin", 14_500_000)],
        "org/huge-lora": [("adapter_config.json", 800), ("adapter_model.safetensors", 10**16)],
    }
    settings = {**slack_settings(slack), "ENGINE": "reference", "BASE_MODEL": "org/base", "ADAPTER": "org/huge-lora",
                "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf")}
    table = rows(doctor(tmp_path, **settings))
    mark, found, _ = table["model BASE_MODEL"]
    # The safetensors shards, not the .bin copy that transformers would not download.
    assert mark == "✔" and found.startswith(f"org/base: to download from {hub}, 14.5 MB; ") and " free in " in found
    mark, found, fix = table["adapter ADAPTER"]
    assert mark == "✘" and "10000.0 TB" in found and "free disk space" in fix
    assert table["GPU"][0] == "✔" and "runs the reference engine on the CPU" in table["GPU"][1]
