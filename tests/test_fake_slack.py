"""The fake Slack server against real slack-sdk / Bolt clients (real HTTP and WebSocket, no mocks)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
from slack_bolt import App
from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from tests.fakes.slack_server import FakeSlack

_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSlack]:
    # slack-sdk reads proxy env vars (ignoring NO_PROXY) for both HTTP and the socket client.
    for var in _PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    with FakeSlack() as server:
        yield server


@pytest.fixture
def client(fake: FakeSlack) -> WebClient:
    return WebClient(base_url=fake.api_url, token=fake.bot_token, timeout=5)


def _start_bolt(fake: FakeSlack, app: App) -> SocketModeHandler:
    handler = SocketModeHandler(app, fake.app_token, web_client=app.client)
    handler.connect()
    fake.wait_connected(timeout=5)
    return handler


def test_auth_test_post_update_and_state(fake: FakeSlack, client: WebClient) -> None:
    auth = client.auth_test()
    assert auth["user_id"] == "UFINBOT"
    assert auth["bot_id"] == "BFINBOT"
    assert auth["team_id"] == "T0001"

    first = client.chat_postMessage(channel="C1", text="안녕하세요", thread_ts="1.000001")
    second = client.chat_postMessage(channel="C1", text="second", blocks=[{"type": "divider"}])
    assert first["ok"] and first["channel"] == "C1"
    assert float(second["ts"]) > float(first["ts"])
    assert first["message"]["text"] == "안녕하세요"

    updated = client.chat_update(channel="C1", ts=first["ts"], text="수정됨")
    assert updated["text"] == "수정됨"

    in_thread = fake.messages("C1", "1.000001")
    assert [m["text"] for m in in_thread] == ["수정됨"]
    assert "edited" in in_thread[0]
    assert fake.messages("C1")[1]["blocks"] == [{"type": "divider"}]

    client.reactions_add(channel="C1", timestamp=second["ts"], name="eyes")
    assert fake.messages("C1")[1]["reactions"] == [{"name": "eyes", "users": ["UFINBOT"], "count": 1}]
    client.reactions_remove(channel="C1", timestamp=second["ts"], name="eyes")
    client.chat_delete(channel="C1", ts=second["ts"])
    assert [m["ts"] for m in fake.messages("C1")] == [first["ts"]]

    # Form-encoded method (params=) and JSON method (json=) both parsed.
    replies = client.conversations_replies(channel="C1", ts="1.000001")
    assert [m["text"] for m in replies["messages"]] == ["수정됨"]
    assert fake.calls_to("chat.postMessage")[0].params["text"] == "안녕하세요"
    assert fake.calls_to("chat.delete")[0].params["ts"] == second["ts"]
    assert all(c.token == fake.bot_token for c in fake.calls)


def test_stream_methods(fake: FakeSlack, client: WebClient) -> None:
    started = client.chat_startStream(channel="C2", thread_ts="5.000001", markdown_text="**삼성")
    client.chat_appendStream(channel="C2", ts=started["ts"], markdown_text="전자**")
    client.chat_stopStream(channel="C2", ts=started["ts"], markdown_text=" 끝")
    [msg] = fake.messages("C2", "5.000001")
    assert msg["text"] == "**삼성전자** 끝"
    assert msg["stream_state"] == "stopped"
    with pytest.raises(SlackApiError) as e:
        client.chat_appendStream(channel="C2", ts=started["ts"], markdown_text="late")
    assert e.value.response["error"] == "message_not_in_streaming_state"

    # slack-sdk's ChatStream helper sends chunks instead of markdown_text.
    stream = client.chat_stream(channel="C2", thread_ts="6.000001", buffer_size=4)
    stream.append(markdown_text="hello ")
    stream.append(markdown_text="world")
    stream.stop()
    [msg] = fake.messages("C2", "6.000001")
    assert msg["text"] == "hello world"


def test_invalid_token_and_unknown_method(fake: FakeSlack) -> None:
    bad = WebClient(base_url=fake.api_url, token="xoxb-wrong", timeout=5)
    with pytest.raises(SlackApiError) as e:
        bad.auth_test()
    assert e.value.response["error"] == "invalid_auth"

    # the bot token is not an app token
    with pytest.raises(SlackApiError) as e:
        WebClient(base_url=fake.api_url, timeout=5).apps_connections_open(app_token=fake.bot_token)
    assert e.value.response["error"] == "invalid_auth"

    good = WebClient(base_url=fake.api_url, token=fake.bot_token, timeout=5)
    with pytest.raises(SlackApiError) as e:
        good.api_call("no.suchMethod", json={"a": 1})
    assert e.value.response["error"] == "unknown_method"
    assert fake.calls_to("no.suchMethod")[0].params == {"a": 1}


def test_fail_next_rate_limit(fake: FakeSlack, client: WebClient) -> None:
    fake.fail_next("chat.postMessage", retry_after=7, times=2)
    for _ in range(2):
        with pytest.raises(SlackApiError) as e:
            client.chat_postMessage(channel="C1", text="hi")
        assert e.value.response.status_code == 429
        assert e.value.response.headers["retry-after"] in (["7"], "7")
        assert e.value.response["error"] == "ratelimited"
    assert client.chat_postMessage(channel="C1", text="hi")["ok"]
    assert [c.status for c in fake.calls_to("chat.postMessage")] == [429, 429, 200]
    assert len(fake.messages("C1")) == 1

    fake.set_response_override("users.info", lambda call: {"ok": True, "user": {"id": call.params["user"]}})
    assert client.users_info(user="U9")["user"] == {"id": "U9"}


def test_wait_for_timeout_dumps_calls(fake: FakeSlack, client: WebClient) -> None:
    client.chat_postMessage(channel="C1", text="visible in dump")
    with pytest.raises(AssertionError, match="visible in dump"):
        fake.wait_for(lambda: fake.messages("C-nope"), timeout=0.2)


def test_bolt_socket_mode_mention_roundtrip(fake: FakeSlack) -> None:
    web = WebClient(base_url=fake.api_url, token=fake.bot_token, timeout=5)
    app = App(client=web, logger=logging.getLogger("fake-slack-test"))
    seen: list[str] = []

    @app.event("app_mention")
    def on_mention(event: dict, say) -> None:
        seen.append(event["text"])
        say(text=f"답변: {event['text']}", thread_ts=event.get("thread_ts") or event["ts"])

    assert fake.calls_to("auth.test"), "Bolt token verification should hit the fake auth.test"
    handler = _start_bolt(fake, app)
    try:
        event = fake.mention_event("삼성전자 주가", channel="C77")
        assert event["text"] == "<@UFINBOT> 삼성전자 주가"
        envelope_id = fake.send_event(event)
        assert fake.wait_acked(envelope_id, timeout=5) is None
        reply = fake.wait_for_message("C77", event["ts"], timeout=5)
        assert reply["text"] == "답변: <@UFINBOT> 삼성전자 주가"
        assert reply["thread_ts"] == event["ts"]
        assert seen == [event["text"]]
        # the user's message is part of the thread history too
        thread = web.conversations_replies(channel="C77", ts=event["ts"])["messages"]
        assert [m.get("user") for m in thread] == ["U123", "UFINBOT"]
        assert fake.calls_to("apps.connections.open")[0].token == fake.app_token
    finally:
        handler.close()


def test_bolt_slash_command_and_interactive_ack_payload(fake: FakeSlack) -> None:
    app = App(client=WebClient(base_url=fake.api_url, token=fake.bot_token, timeout=5))
    clicked = threading.Event()

    @app.command("/finbot")
    def on_command(ack, command: dict) -> None:
        ack(text=f"got {command['text']}")

    @app.action("btn")
    def on_action(ack) -> None:
        ack()
        clicked.set()

    handler = _start_bolt(fake, app)
    try:
        eid = fake.send_slash_command({"text": "환율"})
        assert fake.wait_acked(eid, timeout=5) == {"text": "got 환율"}
        eid = fake.send_interactive({"actions": [{"action_id": "btn", "block_id": "b", "type": "button"}]})
        fake.wait_acked(eid, timeout=5)
        assert clicked.wait(5)
    finally:
        handler.close()


def test_bolt_reconnects_after_disconnect_message(fake: FakeSlack) -> None:
    app = App(client=WebClient(base_url=fake.api_url, token=fake.bot_token, timeout=5))

    @app.event("message")
    def on_message(event: dict, say) -> None:
        say(text="pong", thread_ts=event["ts"])

    handler = _start_bolt(fake, app)
    try:
        fake.send_disconnect()
        fake.wait_for(lambda: fake.total_connections == 2 and fake.connection_count == 1, timeout=5)
        event = fake.message_event("ping", channel_type="im")
        assert event["channel"] == "D123"
        fake.wait_acked(fake.send_event(event), timeout=5)
        assert fake.wait_for_message("D123", event["ts"], timeout=5)["text"] == "pong"
        assert len(fake.calls_to("apps.connections.open")) == 2
    finally:
        handler.close()


def test_stop_leaves_no_threads() -> None:
    before = {t.ident for t in threading.enumerate()}
    with FakeSlack() as server:
        WebClient(base_url=server.api_url, token=server.bot_token, timeout=5).auth_test()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        leftover = [
            t for t in threading.enumerate() if t.ident not in before and t.name.startswith("FakeSlack")
        ]
        if not leftover:
            break
        time.sleep(0.05)
    assert not leftover
