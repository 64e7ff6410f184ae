"""A local fake Slack (Web API over HTTP + Socket Mode over WebSocket) for end-to-end tests.

Real ``slack_sdk.WebClient`` instances, Bolt apps and Socket Mode clients talk real HTTP and
WebSocket to it. The server runs an aiohttp application on ``127.0.0.1`` (OS-chosen port) inside
its own asyncio loop on a background thread; everything public here is synchronous and
thread-safe, meant to be driven from plain pytest code::

    with FakeSlack() as fake:
        client = WebClient(base_url=fake.api_url, token=fake.bot_token)
        app = App(client=client)                     # token verification hits fake auth.test
        handler = SocketModeHandler(app, fake.app_token)  # web_client defaults to app.client
        handler.connect()
        fake.wait_connected()
        envelope_id = fake.send_event(fake.mention_event("삼성전자 주가 알려줘"))
        fake.wait_acked(envelope_id)
        reply = fake.wait_for_message(channel="C123")
        handler.close()                              # close clients *before* the server

Notes:
* slack-sdk's builtin Socket Mode client speaks plain ``ws://`` (no TLS) whenever the URL's port
  is not 443, so the ``ws://127.0.0.1:PORT/socket?ticket=...`` URL from ``apps.connections.open``
  works as is. aiohttp answers its pings (autoping) and never compresses frames (the builtin client
  cannot decode permessage-deflate, so ``compress=False``).
* slack-sdk (Web and Socket Mode) picks up ``HTTPS_PROXY``/``HTTP_PROXY`` from the environment
  and ignores ``NO_PROXY``; unset those in tests that use this fake.
* Messages the fake receives through events (``send_event`` with ``message``/``app_mention``) are
  stored as user messages so ``conversations.replies`` returns whole threads, but
  ``messages()`` only returns messages posted through the Web API unless ``include_events=True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import WSCloseCode, WSMsgType, web

from bot.doctor import MANIFEST_BOT_SCOPES

T = TypeVar("T")

JsonDict = dict[str, Any]
ResponseOverride = JsonDict | Callable[["ApiCall"], JsonDict | None]

APP_ID = "A0001"

# Form-encoded requests carry these as JSON strings; decode them so params look like the JSON style.
_JSON_FIELDS = frozenset(
    {"blocks", "attachments", "prompts", "metadata", "chunks", "loading_messages", "files", "user_ids"}
)


@dataclass
class ApiCall:
    """One Web API request as the fake saw it (``token`` is the bearer or ``token`` param)."""

    method: str
    params: JsonDict
    token: str | None
    status: int = 200
    response: JsonDict | None = None
    at: float = field(default_factory=time.time)

    def short(self) -> str:
        params = json.dumps(self.params, ensure_ascii=False, default=str)
        if len(params) > 300:
            params = params[:300] + "..."
        outcome = "ok" if self.response and self.response.get("ok") else f"error={_err(self.response)}"
        return f"{self.method} [{self.status} {outcome}] {params}"


def _err(response: JsonDict | None) -> str:
    return str(response.get("error")) if response else "?"


@dataclass
class _Fault:
    error: str
    status: int
    retry_after: int | None
    remaining: int


@dataclass
class _Outage:
    """Web API answering HTTP 5xx until ``until`` (time.monotonic) for ``methods`` (None: every method)."""

    status: int
    until: float
    methods: frozenset[str] | None
    json_body: bool

    def applies(self, method: str) -> bool:
        return time.monotonic() < self.until and (self.methods is None or method in self.methods)


@dataclass
class _Record:
    data: JsonDict
    posted: bool  # True: posted through the Web API; False: seen in an event / seeded
    deleted: bool = False


@dataclass
class _Conn:
    conn_id: int
    ws: web.WebSocketResponse
    ticket: str
    connected_at: float


@dataclass
class _Ack:
    envelope_id: str
    message: JsonDict


def _ts_key(ts: str) -> tuple[int, int]:
    sec, _, frac = str(ts).partition(".")
    return int(sec or 0), int((frac + "000000")[:6])


def _chunks_text(chunks: Any) -> str:
    if not isinstance(chunks, list):
        return ""
    return "".join(
        str(c.get("text", "")) for c in chunks if isinstance(c, dict) and c.get("type") == "markdown_text"
    )


class FakeSlack:
    """Fake Slack server. Use as a context manager, or call ``start()``/``stop()``."""

    def __init__(
        self,
        bot_user_id: str = "UFINBOT",
        bot_id: str = "BFINBOT",
        team_id: str = "T0001",
        app_token: str = "xapp-test",
        bot_token: str = "xoxb-test",
        *,
        app_id: str = APP_ID,
        team_name: str = "Finbot Test",
        bot_name: str = "finbot",
        ts_base: int | None = None,
        nudge_interval: float | None = 0.1,
    ) -> None:
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.team_id = team_id
        self.app_token = app_token
        self.bot_token = bot_token
        self.app_id = app_id
        self.team_name = team_name
        self.bot_name = bot_name
        self._nudge_interval = nudge_interval
        # The scopes slack-app-manifest.yaml asks for (bot/doctor.py's list, checked against the manifest by
        # tests/test_first_minutes.py); auth.test reports them in X-OAuth-Scopes, as Slack does.
        self.bot_scopes: list[str] = list(MANIFEST_BOT_SCOPES)

        self._lock = threading.RLock()
        self._ts_base = int(time.time()) if ts_base is None else ts_base
        self._ts_counter = itertools.count(1)
        self._conn_counter = itertools.count(1)

        self.calls: list[ApiCall] = []
        self._records: dict[tuple[str, str], _Record] = {}
        self._ephemerals: list[JsonDict] = []
        self._faults: dict[str, list[_Fault]] = {}
        self._outage: _Outage | None = None
        self._overrides: dict[str, ResponseOverride] = {}
        self._users: dict[str, JsonDict] = {}
        self._tickets: set[str] = set()
        self._conns: list[_Conn] = []
        self._total_connections = 0
        self._envelopes: dict[str, JsonDict] = {}
        self._acks: dict[str, _Ack] = {}
        self.socket_messages: list[JsonDict] = []  # every text frame the clients sent (acks included)
        self.responses: list[JsonDict] = []  # bodies POSTed to response_url
        self._home_views: dict[str, JsonDict] = {}  # views.publish: the latest Home tab per user
        self.opened_views: list[JsonDict] = []  # views.open: every modal opened, oldest first

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None
        self._port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeSlack:
        if self._thread is not None:
            raise RuntimeError("FakeSlack already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self._port = sock.getsockname()[1]
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve(sock))
            except BaseException as e:  # surface startup failures to start()
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"FakeSlack:{self._port}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or errors:
            self._thread.join(1)
            self._thread = None
            loop.close()
            sock.close()
            raise RuntimeError(f"FakeSlack failed to start: {errors!r}")
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            if loop.is_running():
                fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
                with contextlib.suppress(Exception):
                    fut.result(timeout=10)
                loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        finally:
            self._thread = None
            if not loop.is_running():
                loop.close()
            if self._sock is not None:
                self._sock.close()

    def __enter__(self) -> FakeSlack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _serve(self, sock: socket.socket) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/{method}", self._handle_api)
        app.router.add_get("/socket", self._handle_socket)
        app.router.add_post("/response_url/{rid}", self._handle_response_url)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        self._runner = runner

    async def _shutdown(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutdown"), 2)
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ URLs

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeSlack not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """What ``WebClient(base_url=...)`` should be (slack-sdk appends the method name)."""
        return f"{self.base_url}/api/"

    # ------------------------------------------------------------------ inspection

    def calls_to(self, method: str) -> list[ApiCall]:
        with self._lock:
            return [c for c in self.calls if c.method == method]

    def messages(
        self, channel: str | None = None, thread_ts: str | None = None, *, include_events: bool = False
    ) -> list[JsonDict]:
        """Current state (after updates, minus deletions) of messages, oldest first.

        With ``thread_ts`` returns the thread parent (if stored) and its replies. By default only
        messages posted through the Web API; ``include_events=True`` adds user messages that came in
        through ``send_event``/``add_message``.
        """
        with self._lock:
            out = [
                copy.deepcopy(r.data)
                for r in self._records.values()
                if not r.deleted
                and (r.posted or include_events)
                and (channel is None or r.data.get("channel") == channel)
                and (thread_ts is None or r.data.get("thread_ts") == thread_ts or r.data["ts"] == thread_ts)
            ]
        out.sort(key=lambda m: _ts_key(m["ts"]))
        return out

    def message(self, channel: str, ts: str) -> JsonDict | None:
        """One stored message (posted or from events), or None; deleted ones are None."""
        with self._lock:
            rec = self._records.get((channel, ts))
            return None if rec is None or rec.deleted else copy.deepcopy(rec.data)

    def ephemerals(self, channel: str | None = None, user: str | None = None) -> list[JsonDict]:
        with self._lock:
            return [
                copy.deepcopy(m)
                for m in self._ephemerals
                if (channel is None or m["channel"] == channel) and (user is None or m["user"] == user)
            ]

    def add_user(self, user_id: str, **fields: Any) -> None:
        """Customise what ``users.info`` returns for ``user_id`` (merged over the defaults)."""
        with self._lock:
            self._users[user_id] = fields

    def add_message(
        self,
        text: str,
        user: str = "U123",
        channel: str = "C123",
        ts: str | None = None,
        thread_ts: str | None = None,
        **extra: Any,
    ) -> JsonDict:
        """Seed channel history with a user message (no event is sent). Returns the message."""
        msg: JsonDict = {"type": "message", "user": user, "text": text, "ts": ts or self.next_ts()}
        if thread_ts:
            msg["thread_ts"] = thread_ts
        msg.update(extra)
        msg["channel"] = channel
        with self._lock:
            self._records[(channel, msg["ts"])] = _Record(data=msg, posted=False)
        return copy.deepcopy(msg)

    def dump(self) -> str:
        """Human-readable dump of everything recorded (used in wait_for failures)."""
        with self._lock:
            lines = [f"FakeSlack at {self.base_url}: {len(self._conns)} socket connection(s) open"]
            lines.append(f"API calls ({len(self.calls)}):")
            lines += [f"  {c.short()}" for c in self.calls[-50:]]
            lines.append("messages:")
            for rec in sorted(self._records.values(), key=lambda r: _ts_key(r.data["ts"])):
                m = rec.data
                flag = " (deleted)" if rec.deleted else "" if rec.posted else " (event)"
                lines.append(
                    f"  {m.get('channel')} ts={m['ts']} thread_ts={m.get('thread_ts')} "
                    f"user={m.get('user')}{flag}: {str(m.get('text'))[:200]!r}"
                )
            lines.append("envelopes:")
            for eid, env in self._envelopes.items():
                lines.append(f"  {eid} {env['type']} acked={eid in self._acks}")
        return "\n".join(lines)

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 10.0,
        interval: float = 0.02,
        description: str | None = None,
    ) -> T:
        """Poll ``predicate()`` until it returns something truthy and return that value.

        Raises AssertionError with a dump of the server state on timeout.
        """
        deadline = time.monotonic() + timeout
        last: T = predicate()
        while not last:
            if time.monotonic() >= deadline:
                what = description or getattr(predicate, "__name__", "predicate")
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.dump()}")
            time.sleep(interval)
            last = predicate()
        return last

    def wait_for_message(
        self,
        channel: str | None = None,
        thread_ts: str | None = None,
        match: Callable[[JsonDict], bool] | None = None,
        timeout: float = 10.0,
    ) -> JsonDict:
        """Wait for the first posted message (in channel/thread) that satisfies ``match``."""

        def find() -> JsonDict | None:
            for m in self.messages(channel, thread_ts):
                if thread_ts is not None and m["ts"] == thread_ts:
                    continue
                if match is None or match(m):
                    return m
            return None

        return self.wait_for(
            find, timeout, description=f"a message in channel={channel} thread_ts={thread_ts}"
        )

    # ------------------------------------------------------------------ fault injection

    def fail_next(
        self,
        method: str,
        error: str = "ratelimited",
        status: int = 429,
        retry_after: int | None = 1,
        times: int = 1,
    ) -> None:
        """Make the next ``times`` calls to ``method`` fail with ``status`` and ``{"ok": false}``.

        ``retry_after`` (seconds) is sent as the ``Retry-After`` header unless None.
        """
        with self._lock:
            self._faults.setdefault(method, []).append(_Fault(error, status, retry_after, times))

    def fail_server_errors(
        self,
        status: int = 503,
        seconds: float = 20.0,
        methods: str | list[str] | tuple[str, ...] | set[str] | frozenset[str] | None = None,
        *,
        json_body: bool = True,
    ) -> None:
        """An outage: for ``seconds`` from now, Web API calls answer HTTP ``status`` (a 5xx).

        ``methods`` limits it to those methods (None: every Web API method, ``auth.test`` and
        ``apps.connections.open`` included). ``json_body=True`` answers ``{"ok": false, "error":
        ...}`` as Slack's API does; False answers an HTML error page, as a load balancer in front of
        it does. The request fails before it has any effect (nothing is stored), which is what a
        real 5xx usually means; a retried ``chat.postMessage`` therefore cannot show up twice here.
        Socket Mode connections are not touched (see ``drop_connections``). A later call replaces
        the outage; ``end_server_errors`` ends it early.
        """
        if not 500 <= status <= 599:
            raise ValueError(f"not a server error status: {status}")
        if isinstance(methods, str):
            methods = [methods]
        with self._lock:
            self._outage = _Outage(
                status, time.monotonic() + seconds, None if methods is None else frozenset(methods), json_body
            )

    def end_server_errors(self) -> None:
        """End an outage started by ``fail_server_errors`` now."""
        with self._lock:
            self._outage = None

    @property
    def server_errors_active(self) -> bool:
        with self._lock:
            return self._outage is not None and time.monotonic() < self._outage.until

    def server_error_calls(self, method: str | None = None) -> list[ApiCall]:
        """The Web API calls answered with a 5xx (by an outage), optionally of one method."""
        with self._lock:
            return [c for c in self.calls if c.status >= 500 and (method is None or c.method == method)]

    def set_response_override(self, method: str, response: ResponseOverride | None) -> None:
        """Replace the response of ``method``: a dict (returned as is), or a callable taking the
        ApiCall and returning a dict (or None to fall back to the built-in behaviour).
        ``None`` removes the override. Auth is still checked first."""
        with self._lock:
            if response is None:
                self._overrides.pop(method, None)
            else:
                self._overrides[method] = response

    # ------------------------------------------------------------------ Socket Mode (sync API)

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._conns)

    @property
    def total_connections(self) -> int:
        """How many socket connections were ever accepted (reconnects included)."""
        with self._lock:
            return self._total_connections

    def wait_connected(self, timeout: float = 10.0, count: int = 1) -> None:
        """Block until at least ``count`` Socket Mode clients are connected (hello already sent)."""
        self.wait_for(
            lambda: self.connection_count >= count,
            timeout,
            description=f"{count} socket mode connection(s)",
        )

    def send_event(
        self,
        event: JsonDict,
        event_id: str | None = None,
        retry_attempt: int = 0,
        retry_reason: str = "",
        *,
        connect_timeout: float = 5.0,
    ) -> str:
        """Send an ``events_api`` envelope to the (newest) connected client; returns envelope_id.

        ``message``/``app_mention`` events are also stored so conversations.replies sees them.
        """
        envelope_id = str(uuid.uuid4())
        envelope: JsonDict = {
            "envelope_id": envelope_id,
            "type": "events_api",
            "accepts_response_payload": False,
            "retry_attempt": retry_attempt,
            "retry_reason": retry_reason,
            "payload": {
                "token": "x",
                "team_id": self.team_id,
                "context_team_id": self.team_id,
                "context_enterprise_id": None,
                "api_app_id": self.app_id,
                "event": event,
                "type": "event_callback",
                "event_id": event_id or "Ev" + uuid.uuid4().hex[:10].upper(),
                "event_time": int(time.time()),
                "authorizations": [
                    {
                        "enterprise_id": None,
                        "team_id": self.team_id,
                        "user_id": self.bot_user_id,
                        "is_bot": True,
                        "is_enterprise_install": False,
                    }
                ],
                "is_ext_shared_channel": False,
                "event_context": "4-" + uuid.uuid4().hex,
            },
        }
        self._remember_event_message(event)
        self._send_envelope(envelope, connect_timeout)
        return envelope_id

    def send_slash_command(self, payload: JsonDict, *, connect_timeout: float = 5.0) -> str:
        """Send a ``slash_commands`` envelope; ``payload`` is merged over realistic defaults
        (its ``response_url`` points at this fake, see ``responses``)."""
        envelope_id = str(uuid.uuid4())
        full: JsonDict = {
            "token": "x",
            "team_id": self.team_id,
            "team_domain": "finbot-test",
            "channel_id": "C123",
            "channel_name": "general",
            "user_id": "U123",
            "user_name": "tester",
            "command": "/finbot",
            "text": "",
            "api_app_id": self.app_id,
            "is_enterprise_install": "false",
            "response_url": f"{self.base_url}/response_url/{envelope_id}",
            "trigger_id": f"{next(self._ts_counter)}.{self.team_id}.trigger",
        }
        full.update(payload)
        envelope = {
            "envelope_id": envelope_id,
            "type": "slash_commands",
            "accepts_response_payload": True,
            "payload": full,
        }
        self._send_envelope(envelope, connect_timeout)
        return envelope_id

    def send_interactive(self, payload: JsonDict, *, connect_timeout: float = 5.0) -> str:
        """Send an ``interactive`` envelope (block_actions by default); returns envelope_id."""
        envelope_id = str(uuid.uuid4())
        full: JsonDict = {
            "type": "block_actions",
            "token": "x",
            "api_app_id": self.app_id,
            "team": {"id": self.team_id, "domain": "finbot-test"},
            "user": {"id": "U123", "username": "tester", "name": "tester", "team_id": self.team_id},
            "is_enterprise_install": False,
            "enterprise": None,
            "trigger_id": f"{next(self._ts_counter)}.{self.team_id}.trigger",
            "response_url": f"{self.base_url}/response_url/{envelope_id}",
        }
        full.update(payload)
        envelope = {
            "envelope_id": envelope_id,
            "type": "interactive",
            "accepts_response_payload": full.get("type") in ("view_submission", "block_suggestion"),
            "payload": full,
        }
        self._send_envelope(envelope, connect_timeout)
        return envelope_id

    def send_disconnect(self, reason: str = "refresh_requested", *, connect_timeout: float = 5.0) -> None:
        """Send Slack's ``disconnect`` message (clients are expected to reconnect)."""
        message = {"type": "disconnect", "reason": reason, "debug_info": {"host": "fake-slack"}}
        self._send_envelope(message, connect_timeout)

    def drop_connections(self) -> None:
        """Close every open WebSocket from the server side (code 1001)."""
        loop = self._require_loop()

        async def close_all() -> None:
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.ws.close(code=WSCloseCode.GOING_AWAY), 2)

        asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout=10)

    def acked(self, envelope_id: str) -> bool:
        with self._lock:
            return envelope_id in self._acks

    def ack_payload(self, envelope_id: str) -> JsonDict | None:
        """The ``payload`` the client sent with its ack (None if no ack or no payload)."""
        with self._lock:
            ack = self._acks.get(envelope_id)
            return copy.deepcopy(ack.message.get("payload")) if ack else None

    def wait_acked(self, envelope_id: str, timeout: float = 10.0) -> JsonDict | None:
        """Wait until ``envelope_id`` is acked; returns the ack's payload (if any)."""
        self.wait_for(lambda: self.acked(envelope_id), timeout, description=f"ack of {envelope_id}")
        return self.ack_payload(envelope_id)

    # ------------------------------------------------------------------ event builders

    def next_ts(self) -> str:
        """A fresh message ts, strictly increasing across everything this fake generates."""
        micros = next(self._ts_counter) * 100
        return f"{self._ts_base + micros // 1_000_000}.{micros % 1_000_000:06d}"

    def mention_event(
        self,
        text: str,
        user: str = "U123",
        channel: str = "C123",
        ts: str | None = None,
        thread_ts: str | None = None,
    ) -> JsonDict:
        """An ``app_mention`` event; ``text`` gets a leading ``<@BOT>`` unless it already mentions it."""
        mention = f"<@{self.bot_user_id}>"
        full_text = text if mention in text else f"{mention} {text}"
        return self._user_event("app_mention", full_text, user, channel, ts, thread_ts)

    def message_event(
        self,
        text: str,
        user: str = "U123",
        channel: str | None = None,
        ts: str | None = None,
        thread_ts: str | None = None,
        channel_type: str = "channel",
        **extra: Any,
    ) -> JsonDict:
        """A ``message`` event (channel defaults to C123, or D123 for ``channel_type="im"``)."""
        if channel is None:
            channel = "D123" if channel_type == "im" else "C123"
        event = self._user_event("message", text, user, channel, ts, thread_ts)
        event["channel_type"] = channel_type
        event.update(extra)
        return event

    def _user_event(
        self, event_type: str, text: str, user: str, channel: str, ts: str | None, thread_ts: str | None
    ) -> JsonDict:
        """What Slack sends for a person's message, as an ``app_mention`` or a ``message`` event."""
        ts = ts or self.next_ts()
        event: JsonDict = {
            "type": event_type,
            "user": user,
            "text": text,
            "ts": ts,
            "client_msg_id": str(uuid.uuid4()),
            "team": self.team_id,
            "blocks": [_rich_text_block(text)],
            "channel": channel,
            "event_ts": ts,
        }
        if thread_ts:
            event["thread_ts"] = thread_ts
        return event

    # ------------------------------------------------------------------ internals (any thread)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._thread is None:
            raise RuntimeError("FakeSlack not started")
        return self._loop

    def _remember_event_message(self, event: JsonDict) -> None:
        if event.get("type") not in ("message", "app_mention") or event.get("subtype"):
            return
        channel, ts = event.get("channel"), event.get("ts")
        if not channel or not ts:
            return
        msg = {
            k: copy.deepcopy(v)
            for k, v in event.items()
            if k not in ("channel_type", "event_ts", "client_msg_id", "hidden")
        }
        msg["type"] = "message"
        msg["channel"] = channel
        with self._lock:
            if (channel, ts) not in self._records:
                self._records[(channel, ts)] = _Record(data=msg, posted=False)

    def _send_envelope(self, envelope: JsonDict, connect_timeout: float) -> None:
        loop = self._require_loop()
        self.wait_connected(connect_timeout)
        with self._lock:
            conn = self._conns[-1]
            if "envelope_id" in envelope:
                self._envelopes[envelope["envelope_id"]] = copy.deepcopy(envelope)
        data = json.dumps(envelope, ensure_ascii=False)
        asyncio.run_coroutine_threadsafe(conn.ws.send_str(data), loop).result(timeout=10)

    # ------------------------------------------------------------------ HTTP handlers (loop thread)

    async def _handle_response_url(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {"raw": await request.text()}
        with self._lock:
            self.responses.append({"response_url_id": request.match_info["rid"], "body": body})
        return web.Response(text="ok")

    async def _handle_socket(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        with self._lock:
            known = ticket in self._tickets
        if not known:
            return web.Response(status=401, text="invalid ticket")
        ws = web.WebSocketResponse(autoping=True, heartbeat=None, compress=False)
        await ws.prepare(request)
        hello = {
            "type": "hello",
            "num_connections": self.connection_count + 1,
            "debug_info": {
                "host": "applink-fake-1",
                "build_number": 1,
                "approximate_connection_time": 18060,
            },
            "connection_info": {"app_id": self.app_id},
        }
        await ws.send_str(json.dumps(hello))
        conn = _Conn(next(self._conn_counter), ws, ticket, time.time())
        with self._lock:
            self._conns.append(conn)
            self._total_connections += 1
        nudger = asyncio.create_task(self._nudge(ws)) if self._nudge_interval else None
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._on_socket_text(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            if nudger is not None:
                nudger.cancel()
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
        return ws

    async def _nudge(self, ws: web.WebSocketResponse) -> None:
        # slack-sdk's builtin client blocks in recv() (3s socket timeout) while holding the lock that
        # close() needs; a steady trickle of server pings makes SocketModeHandler.close() return fast.
        # (aiohttp's heartbeat= would also drop the connection on a late pong, which we don't want.)
        assert self._nudge_interval is not None
        with contextlib.suppress(Exception):
            while not ws.closed:
                await asyncio.sleep(self._nudge_interval)
                await ws.ping(b"fake-slack")

    def _on_socket_text(self, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            message = {"raw": data}
        with self._lock:
            self.socket_messages.append(message)
            eid = message.get("envelope_id") if isinstance(message, dict) else None
            if eid and eid not in self._acks:
                self._acks[eid] = _Ack(eid, message)

    async def _parse_params(self, request: web.Request) -> JsonDict:
        params: JsonDict = dict(request.query)
        ctype = request.content_type
        if request.method == "POST" and request.can_read_body:
            if ctype == "application/json":
                body = await request.json()
                if not isinstance(body, dict):
                    raise ValueError("JSON body must be an object")
                params.update(body)
            elif ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
                form = await request.post()
                for key, value in form.items():
                    if isinstance(value, web.FileField):
                        params[key] = {
                            "filename": value.filename,
                            "content_type": value.content_type,
                            "size": len(value.file.read()),
                        }
                    else:
                        params[key] = value
            else:
                text = await request.text()
                if text:
                    params["_body"] = text
        for key in _JSON_FIELDS & params.keys():
            value = params[key]
            if isinstance(value, str) and value[:1] in ("[", "{"):
                with contextlib.suppress(ValueError):
                    params[key] = json.loads(value)
        return params

    async def _handle_api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        token: str | None = None
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        try:
            params = await self._parse_params(request)
        except ValueError:
            params = {}
            call = ApiCall(method, params, token)
            return self._reply(call, {"ok": False, "error": "invalid_json"})
        body_token = params.pop("token", None)
        if token is None and isinstance(body_token, str):
            token = body_token
        call = ApiCall(method, params, token)

        with self._lock:
            outage = self._outage if self._outage is not None and self._outage.applies(method) else None
        if outage is not None:
            return self._server_error(call, outage)

        with self._lock:
            faults = self._faults.get(method)
            fault = faults[0] if faults else None
            if fault is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    faults.pop(0)  # type: ignore[union-attr]
        if fault is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            return self._reply(call, {"ok": False, "error": fault.error}, fault.status, headers)

        expected = self.app_token if method == "apps.connections.open" else self.bot_token
        if not token:
            return self._reply(call, {"ok": False, "error": "not_authed"})
        if token != expected:
            return self._reply(call, {"ok": False, "error": "invalid_auth"})

        with self._lock:
            override = self._overrides.get(method)
        if override is not None:
            result = override(call) if callable(override) else copy.deepcopy(override)
            if result is not None:
                return self._reply(call, result)

        handler = getattr(self, "_api_" + method.replace(".", "_"), None)
        if handler is None:
            return self._reply(call, {"ok": False, "error": "unknown_method"})
        # A handler's change of state and its call in `calls` become visible together: a test that sees a
        # stopped stream's final message also finds the chat.stopStream call that made it.
        with self._lock:
            try:
                result = handler(params)
            except _ApiError as e:
                result = {"ok": False, "error": e.error}
            return self._reply(call, result)

    def _server_error(self, call: ApiCall, outage: _Outage) -> web.Response:
        error = "service_unavailable" if outage.status == 503 else "internal_error"
        if outage.json_body:
            return self._reply(call, {"ok": False, "error": error}, outage.status)
        call.status = outage.status
        call.response = None
        with self._lock:
            self.calls.append(call)
        page = f"<html><body><h1>{outage.status} {error.replace('_', ' ')}</h1></body></html>"
        return web.Response(status=outage.status, text=page, content_type="text/html")

    def _reply(
        self, call: ApiCall, body: JsonDict, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        call.status = status
        call.response = copy.deepcopy(body)
        with self._lock:
            self.calls.append(call)
            if call.method == "auth.test" and call.token == self.bot_token:
                headers = {**(headers or {}), "X-OAuth-Scopes": ",".join(self.bot_scopes)}
        return web.json_response(body, status=status, headers=headers, dumps=_dumps)

    # ------------------------------------------------------------------ Web API methods

    def _bot_message(self, channel: str, ts: str, params: JsonDict) -> JsonDict:
        msg: JsonDict = {
            "type": "message",
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "app_id": self.app_id,
            "team": self.team_id,
            "text": params.get("text", ""),
            "ts": ts,
        }
        for key in ("thread_ts", "blocks", "attachments", "metadata", "reply_broadcast", "username"):
            if params.get(key) is not None:
                msg[key] = params[key]
        msg["channel"] = channel
        return msg

    def _store(self, msg: JsonDict) -> None:
        with self._lock:
            self._records[(msg["channel"], msg["ts"])] = _Record(data=msg, posted=True)

    def _find(self, params: JsonDict, ts_key: str = "ts") -> _Record:
        channel, ts = params.get("channel"), params.get(ts_key)
        if not channel:
            raise _ApiError("channel_not_found")
        if not ts:
            raise _ApiError("invalid_arguments")
        rec = self._records.get((str(channel), str(ts)))
        if rec is None or rec.deleted:
            raise _ApiError("message_not_found")
        return rec

    @staticmethod
    def _public(msg: JsonDict) -> JsonDict:
        return {k: copy.deepcopy(v) for k, v in msg.items() if k != "channel"}

    def _api_auth_test(self, params: JsonDict) -> JsonDict:
        return {
            "ok": True,
            "url": "https://finbot-test.slack.com/",
            "team": self.team_name,
            "user": self.bot_name,
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _api_apps_connections_open(self, params: JsonDict) -> JsonDict:
        ticket = str(uuid.uuid4())
        with self._lock:
            self._tickets.add(ticket)
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket?ticket={ticket}&app_id={self.app_id}"}

    def _api_chat_postMessage(self, params: JsonDict) -> JsonDict:
        channel = params.get("channel")
        if not channel:
            raise _ApiError("channel_not_found")
        if not params.get("text") and not params.get("blocks") and not params.get("attachments"):
            raise _ApiError("no_text")
        msg = self._bot_message(str(channel), self.next_ts(), params)
        self._store(msg)
        return {"ok": True, "channel": channel, "ts": msg["ts"], "message": self._public(msg)}

    def _api_chat_update(self, params: JsonDict) -> JsonDict:
        with self._lock:
            rec = self._find(params)
            if not rec.posted:
                raise _ApiError("cant_update_message")
            for key in ("text", "blocks", "attachments", "metadata"):
                if key in params and params[key] is not None:
                    rec.data[key] = params[key]
            rec.data["edited"] = {"user": self.bot_user_id, "ts": self.next_ts()}
            msg = rec.data
            return {
                "ok": True,
                "channel": msg["channel"],
                "ts": msg["ts"],
                "text": msg.get("text", ""),
                "message": self._public(msg),
            }

    def _api_chat_delete(self, params: JsonDict) -> JsonDict:
        with self._lock:
            rec = self._find(params)
            if not rec.posted:
                raise _ApiError("cant_delete_message")
            rec.deleted = True
            return {"ok": True, "channel": rec.data["channel"], "ts": rec.data["ts"]}

    def _api_chat_postEphemeral(self, params: JsonDict) -> JsonDict:
        channel, user = params.get("channel"), params.get("user")
        if not channel:
            raise _ApiError("channel_not_found")
        if not user:
            raise _ApiError("user_not_in_channel")
        ts = self.next_ts()
        msg = self._bot_message(str(channel), ts, params)
        msg["user_to"] = user
        msg["user"] = user
        with self._lock:
            self._ephemerals.append(msg)
        return {"ok": True, "message_ts": ts}

    def _api_reactions_add(self, params: JsonDict) -> JsonDict:
        name = str(params.get("name", "")).strip(":")
        if not name:
            raise _ApiError("invalid_name")
        with self._lock:
            rec = self._find(params, "timestamp")
            reactions: list[JsonDict] = rec.data.setdefault("reactions", [])
            for r in reactions:
                if r["name"] == name:
                    if self.bot_user_id in r["users"]:
                        raise _ApiError("already_reacted")
                    r["users"].append(self.bot_user_id)
                    r["count"] += 1
                    break
            else:
                reactions.append({"name": name, "users": [self.bot_user_id], "count": 1})
        return {"ok": True}

    def _api_reactions_remove(self, params: JsonDict) -> JsonDict:
        name = str(params.get("name", "")).strip(":")
        with self._lock:
            rec = self._find(params, "timestamp")
            reactions: list[JsonDict] = rec.data.get("reactions", [])
            for r in reactions:
                if r["name"] == name and self.bot_user_id in r["users"]:
                    r["users"].remove(self.bot_user_id)
                    r["count"] -= 1
                    if r["count"] <= 0:
                        reactions.remove(r)
                    if not reactions:
                        rec.data.pop("reactions", None)
                    return {"ok": True}
        raise _ApiError("no_reaction")

    def _api_conversations_replies(self, params: JsonDict) -> JsonDict:
        channel, ts = params.get("channel"), params.get("ts")
        if not channel:
            raise _ApiError("channel_not_found")
        if not ts:
            raise _ApiError("invalid_arguments")
        thread = self.messages(str(channel), str(ts), include_events=True)
        if not thread:
            raise _ApiError("thread_not_found")
        parent = [m for m in thread if m["ts"] == ts]
        replies = [m for m in thread if m["ts"] != ts]
        if parent and replies:
            parent[0]["thread_ts"] = ts
            parent[0]["reply_count"] = len(replies)
            parent[0]["latest_reply"] = replies[-1]["ts"]
        thread = parent + replies
        if params.get("oldest"):
            thread = [m for m in thread if _ts_key(m["ts"]) >= _ts_key(str(params["oldest"]))]
        if params.get("latest"):
            thread = [m for m in thread if _ts_key(m["ts"]) <= _ts_key(str(params["latest"]))]
        return self._page([self._public(m) for m in thread], params)

    def _api_conversations_history(self, params: JsonDict) -> JsonDict:
        channel = params.get("channel")
        if not channel:
            raise _ApiError("channel_not_found")
        top = [
            self._public(m)
            for m in self.messages(str(channel), include_events=True)
            if m.get("thread_ts") in (None, m["ts"]) or m.get("reply_broadcast")
        ]
        top.reverse()
        return self._page(top, params)

    @staticmethod
    def _page(items: list[JsonDict], params: JsonDict) -> JsonDict:
        start = int(params.get("cursor") or 0)
        limit = int(params.get("limit") or 1000) or 1000
        page = items[start : start + limit]
        more = start + limit < len(items)
        return {
            "ok": True,
            "messages": page,
            "has_more": more,
            "response_metadata": {"next_cursor": str(start + limit) if more else ""},
        }

    def _api_conversations_info(self, params: JsonDict) -> JsonDict:
        channel = str(params.get("channel") or "")
        if not channel:
            raise _ApiError("channel_not_found")
        is_im = channel.startswith("D")
        return {
            "ok": True,
            "channel": {
                "id": channel,
                "name": None if is_im else f"channel-{channel.lower()}",
                "is_channel": channel.startswith("C"),
                "is_group": channel.startswith("G"),
                "is_im": is_im,
                "is_private": not channel.startswith("C"),
                "is_member": True,
                "is_archived": False,
            },
        }

    def _api_users_info(self, params: JsonDict) -> JsonDict:
        user_id = str(params.get("user") or "")
        if not user_id:
            raise _ApiError("user_not_found")
        is_bot = user_id == self.bot_user_id
        name = self.bot_name if is_bot else f"user_{user_id.lower()}"
        user: JsonDict = {
            "id": user_id,
            "team_id": self.team_id,
            "name": name,
            "real_name": name,
            "deleted": False,
            "is_bot": is_bot,
            "is_admin": False,
            "tz": "Asia/Seoul",
            "tz_label": "Korea Standard Time",
            "tz_offset": 32400,
            "locale": "ko-KR",
            "profile": {"real_name": name, "display_name": name, "bot_id": self.bot_id if is_bot else None},
        }
        with self._lock:
            user.update(copy.deepcopy(self._users.get(user_id, {})))
        return {"ok": True, "user": user}

    def _api_bots_info(self, params: JsonDict) -> JsonDict:
        bot = str(params.get("bot") or self.bot_id)
        if bot != self.bot_id:
            raise _ApiError("bot_not_found")
        return {
            "ok": True,
            "bot": {
                "id": self.bot_id,
                "deleted": False,
                "name": self.bot_name,
                "updated": self._ts_base,
                "app_id": self.app_id,
                "user_id": self.bot_user_id,
                "icons": {},
            },
        }

    @staticmethod
    def _require_thread(params: JsonDict) -> None:
        if not params.get("channel_id"):
            raise _ApiError("channel_not_found")
        if not params.get("thread_ts"):
            raise _ApiError("invalid_arguments")

    def _api_assistant_threads_setStatus(self, params: JsonDict) -> JsonDict:
        self._require_thread(params)
        return {"ok": True}

    def _api_assistant_threads_setTitle(self, params: JsonDict) -> JsonDict:
        self._require_thread(params)
        return {"ok": True}

    def _api_assistant_threads_setSuggestedPrompts(self, params: JsonDict) -> JsonDict:
        if not params.get("channel_id"):
            raise _ApiError("channel_not_found")
        if not isinstance(params.get("prompts"), list):
            raise _ApiError("invalid_arguments")
        return {"ok": True}

    def _api_chat_startStream(self, params: JsonDict) -> JsonDict:
        channel = params.get("channel")
        if not channel:
            raise _ApiError("channel_not_found")
        if not params.get("thread_ts"):
            raise _ApiError("invalid_arguments")
        text = str(params.get("markdown_text") or "") + _chunks_text(params.get("chunks"))
        msg = self._bot_message(str(channel), self.next_ts(), {**params, "text": text})
        msg["stream_state"] = "streaming"
        self._store(msg)
        return {"ok": True, "channel": channel, "ts": msg["ts"]}

    def _stream_record(self, params: JsonDict) -> _Record:
        rec = self._find(params)
        if rec.data.get("stream_state") != "streaming":
            raise _ApiError("message_not_in_streaming_state")
        return rec

    def _api_chat_appendStream(self, params: JsonDict) -> JsonDict:
        with self._lock:
            rec = self._stream_record(params)
            rec.data["text"] += str(params.get("markdown_text") or "") + _chunks_text(params.get("chunks"))
            return {"ok": True, "channel": rec.data["channel"], "ts": rec.data["ts"]}

    def _api_chat_stopStream(self, params: JsonDict) -> JsonDict:
        with self._lock:
            rec = self._stream_record(params)
            rec.data["text"] += str(params.get("markdown_text") or "") + _chunks_text(params.get("chunks"))
            for key in ("blocks", "metadata"):
                if params.get(key) is not None:
                    rec.data[key] = params[key]
            rec.data["stream_state"] = "stopped"
            msg = rec.data
            return {"ok": True, "channel": msg["channel"], "ts": msg["ts"], "message": self._public(msg)}

    # ------------------------------------------------------------------ views (App Home, modals)

    def home_view(self, user_id: str) -> JsonDict | None:
        """The Home tab last published for `user_id` (views.publish), or None."""
        with self._lock:
            view = self._home_views.get(user_id)
            return copy.deepcopy(view) if view is not None else None

    def home_opened_event(self, user: str = "U123", tab: str = "home") -> JsonDict:
        """An ``app_home_opened`` event (the user opened the app's Home or Messages tab)."""
        return {"type": "app_home_opened", "user": user, "channel": "D" + user[1:], "tab": tab,
                "event_ts": self.next_ts()}

    def _view_param(self, params: JsonDict, view_type: str) -> JsonDict:
        view = params.get("view")
        if isinstance(view, str):
            try:
                view = json.loads(view)
            except ValueError:
                raise _ApiError("invalid_arguments") from None
        if not isinstance(view, dict) or view.get("type") != view_type:
            raise _ApiError("invalid_arguments")
        if len(view.get("blocks") or []) > 100:
            raise _ApiError("invalid_blocks")  # Slack's limit for Home tabs and modals
        stored = copy.deepcopy(view)
        stored.update({"id": "V" + uuid.uuid4().hex[:10].upper(), "team_id": self.team_id, "app_id": self.app_id,
                       "state": {"values": {}}})
        return stored

    def _api_views_publish(self, params: JsonDict) -> JsonDict:
        user_id = params.get("user_id")
        if not user_id:
            raise _ApiError("invalid_arguments")
        view = self._view_param(params, "home")
        with self._lock:
            self._home_views[str(user_id)] = view
        return {"ok": True, "view": copy.deepcopy(view)}

    def _api_views_open(self, params: JsonDict) -> JsonDict:
        if not params.get("trigger_id"):
            raise _ApiError("invalid_trigger_id")
        view = self._view_param(params, "modal")
        with self._lock:
            self.opened_views.append(view)
        return {"ok": True, "view": copy.deepcopy(view)}


class _ApiError(Exception):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _rich_text_block(text: str) -> JsonDict:
    return {
        "type": "rich_text",
        "block_id": uuid.uuid4().hex[:5],
        "elements": [{"type": "rich_text_section", "elements": [{"type": "text", "text": text}]}],
    }
