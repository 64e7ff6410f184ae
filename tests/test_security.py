"""HTTP mode security against the real `finbot run` process: signatures, secrets in logs, allow-lists."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from slack_sdk.signature import SignatureVerifier

from tests.e2e.process import start_finbot
from tests.fakes.slack_server import FakeSlack

pytestmark = pytest.mark.e2e

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BOT_TOKEN = "xoxb-1234-secret-bot-token"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HttpBot:
    def __init__(self, fake: FakeSlack, port: int, log: Path) -> None:
        self.fake = fake
        self.url = f"http://127.0.0.1:{port}/slack/events"
        self.log = log

    def post(self, body: dict, *, secret: str | None = SIGNING_SECRET, timestamp: int | None = None,
             signature: str | None = None) -> int:
        raw = json.dumps(body).encode()
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-Slack-Request-Timestamp"] = stamp
            headers["X-Slack-Signature"] = signature or SignatureVerifier(secret).generate_signature(
                timestamp=stamp, body=raw.decode()
            )
        request = urllib.request.Request(self.url, data=raw, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def envelope(self, event: dict, team_id: str | None = None) -> dict:
        return {
            "token": "legacy", "team_id": team_id or self.fake.team_id, "api_app_id": self.fake.app_id,
            "type": "event_callback", "event_id": "Ev" + str(time.monotonic_ns()), "event_time": int(time.time()),
            "event": event,
            "authorizations": [{"team_id": self.fake.team_id, "user_id": self.fake.bot_user_id, "is_bot": True}],
        }


@pytest.fixture(scope="module")
def http_bot(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("http-bot")
    log = tmp / "finbot.log"
    port = _free_port()
    with FakeSlack(bot_token=BOT_TOKEN) as fake:
        process = start_finbot(
            "run", cwd=tmp, log_path=log,
            SLACK_MODE="http", HTTP_HOST="127.0.0.1", HTTP_PORT=str(port),
            SLACK_SIGNING_SECRET=SIGNING_SECRET, SLACK_BOT_TOKEN=BOT_TOKEN, SLACK_API_URL=fake.api_url,
            DATABASE_URL=f"sqlite:///{tmp / 'finbot.db'}", ENGINE="fake", BASE_MODEL=str(tiny_checkpoint.base_dir),
            LOG_LEVEL="DEBUG", ALLOWED_CHANNEL_IDS="C1,C2", ALLOWED_TEAM_IDS=fake.team_id,
        )
        bot = HttpBot(fake, port, log)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert process.poll() is None, log.read_text(errors="replace")
                    assert time.monotonic() < deadline, "HTTP server did not start"
                    time.sleep(0.2)
            yield bot
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text(errors="replace")


def test_correctly_signed_request_is_accepted_and_answered(http_bot: HttpBot):
    fake = http_bot.fake
    mention = fake.mention_event("기준금리가 뭐야?", channel="C1")
    assert http_bot.post(http_bot.envelope(mention)) == 200
    reply = fake.wait_for_message(
        channel="C1", thread_ts=mention["ts"], match=lambda m: "테스트 답변입니다" in (m.get("text") or ""), timeout=30
    )
    assert reply["text"].startswith("테스트 답변입니다. 질문: 기준금리가 뭐야?")  # the answer, not an apology


@pytest.mark.parametrize(
    "kind", ["wrong_secret", "missing", "stale", "future", "tampered", "garbage_signature"]
)
def test_bad_signatures_are_rejected_with_401(http_bot: HttpBot, kind: str):
    fake = http_bot.fake
    mention = fake.mention_event(f"서명 테스트 {kind}", channel="C2")
    body = http_bot.envelope(mention)
    now = int(time.time())
    if kind == "wrong_secret":
        status = http_bot.post(body, secret="not-the-secret")
    elif kind == "missing":
        status = http_bot.post(body, secret=None)
    elif kind == "stale":
        status = http_bot.post(body, timestamp=now - 5 * 60 - 30)
    elif kind == "future":
        status = http_bot.post(body, timestamp=now + 5 * 60 + 30)
    elif kind == "tampered":
        good = SignatureVerifier(SIGNING_SECRET).generate_signature(timestamp=str(now), body="{}")
        status = http_bot.post(body, timestamp=now, signature=good)
    else:
        status = http_bot.post(body, signature="v0=deadbeef")
    assert status == 401
    time.sleep(0.3)
    assert fake.messages(channel="C2", thread_ts=mention["ts"]) == []


def test_allow_lists_drop_other_channels_and_workspaces(http_bot: HttpBot):
    fake = http_bot.fake
    other_channel = fake.mention_event("허용되지 않은 채널", channel="C9")
    other_team = fake.mention_event("다른 워크스페이스", channel="C1")
    # Acknowledged (200, so Slack does not retry), but never answered.
    assert http_bot.post(http_bot.envelope(other_channel)) == 200
    assert http_bot.post(http_bot.envelope(other_team, team_id="TOTHER")) == 200
    allowed = fake.mention_event("허용된 채널", channel="C2")
    assert http_bot.post(http_bot.envelope(allowed)) == 200
    fake.wait_for_message(channel="C2", thread_ts=allowed["ts"], timeout=30)
    assert fake.messages(channel="C9") == []
    assert fake.messages(channel="C1", thread_ts=other_team["ts"]) == []


def test_secrets_never_appear_in_debug_logs(http_bot: HttpBot):
    # Runs after the others (file order): the log then covers start-up, answers and rejections.
    fake = http_bot.fake
    assert any(call.token == BOT_TOKEN for call in fake.calls)  # the token was really used
    output = http_bot.log.read_text(errors="replace")
    assert "DEBUG" in output
    for secret in (BOT_TOKEN, SIGNING_SECRET, BOT_TOKEN.split("-", 1)[1]):
        assert secret not in output
