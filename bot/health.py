"""/metrics, /healthz and /readyz on METRICS_PORT, for Prometheus and for process managers.

- ``/healthz``: 200 while the process runs (its HTTP thread answers): for liveness probes, which
  restart a process that stopped answering. It does not look at Slack or the database, so an
  outage of theirs never gets a healthy process restarted.
- ``/readyz``: 200 when this instance can answer questions, 503 otherwise, with a JSON body
  naming each check: the database reachable (a fresh connection reads the migration table), Slack
  connected (Socket Mode: the WebSocket is up; HTTP mode: the request server runs) and the engine
  loaded and answering (a one-token probe, skipped while real answers are flowing). Before the
  model is loaded it says "starting", after SIGTERM "stopping". Results are cached for
  `READINESS_CACHE_S`, so frequent probes cost nothing; each check has its own time limit, so a
  probe answers within about `ENGINE_PROBE_TIMEOUT_S` even when a server hangs.
- ``/metrics``: Prometheus' text format (OpenMetrics when asked for), see bot/metrics.py.

The server starts before the model loads (liveness answers during minutes of loading) and runs in
Socket Mode too, where finbot has no other listening port.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client.exposition import choose_encoder

from bot import metrics
from bot.errors import first_line

if TYPE_CHECKING:
    from bot.app import Finbot
    from bot.replies import AnswerService
    from bot.settings import FinbotSettings
    from llm.engine import GenerationEngine

logger = logging.getLogger(__name__)

READINESS_CACHE_S = 3.0
DATABASE_CHECK_TIMEOUT_S = 4.0
ENGINE_PROBE_TIMEOUT_S = 5.0
# An engine that produced answer text this recently is answering: no probe needed.
RECENT_OUTPUT_S = 30.0
PROBE_QUESTION = "안녕"

# A check returns a short note ("ok", "busy"…) or raises with the reason it failed.
Check = Callable[[], str]


class MonitoringPortError(Exception):
    """METRICS_PORT cannot be served (taken, or not allowed); the message names the setting."""


@dataclass(frozen=True)
class ReadinessReport:
    ready: bool
    state: str
    checks: dict[str, str]

    def as_json(self) -> bytes:
        return json.dumps(
            {"ready": self.ready, "state": self.state, "checks": self.checks}, ensure_ascii=False
        ).encode()


class Readiness:
    """The checks behind /readyz, run in parallel with a time limit each, cached briefly."""

    def __init__(self, cache_s: float = READINESS_CACHE_S) -> None:
        self._cache_s = cache_s
        self._checks: dict[str, tuple[Check, float]] = {}
        self._state = "starting"
        self._lock = threading.Lock()
        self._evaluating = threading.Lock()
        self._cached: tuple[float, ReadinessReport] | None = None
        # A check that overran its limit keeps running in its thread; it is not started twice.
        self._running: dict[str, Future[str]] = {}
        self._was_ready: bool | None = None

    def add_check(self, name: str, check: Check, timeout_s: float) -> None:
        with self._lock:
            self._checks[name] = (check, timeout_s)
            self._cached = None

    def set_state(self, state: str) -> None:
        """"starting" (loading), "serving" (checks decide) or "stopping" (never ready again)."""
        with self._lock:
            self._state = state
            self._cached = None

    def report(self) -> ReadinessReport:
        with self._evaluating:  # concurrent probes share one evaluation
            with self._lock:
                cached = self._cached
            if cached is not None and time.monotonic() - cached[0] < self._cache_s:
                return cached[1]
            report = self._evaluate()
            with self._lock:
                self._cached = (time.monotonic(), report)
            self._log_change(report)
            return report

    def _evaluate(self) -> ReadinessReport:
        with self._lock:
            state = self._state
            checks = dict(self._checks)
        if state != "serving":
            return ReadinessReport(False, state, {})
        started: dict[str, tuple[Future[str], float]] = {}
        for name, (check, timeout_s) in checks.items():
            future = self._running.get(name)
            if future is None or future.done():
                future = self._start(name, check)
            started[name] = (future, timeout_s)
        results: dict[str, str] = {}
        ready = True
        deadline_base = time.monotonic()
        for name, (future, timeout_s) in started.items():
            remaining = max(0.0, deadline_base + timeout_s - time.monotonic())
            try:
                results[name] = future.result(timeout=remaining)
            except TimeoutError:
                results[name] = f"failed: no answer within {timeout_s:g} s"
                ready = False
            except Exception as error:
                results[name] = f"failed: {_short(error)}"
                ready = False
        return ReadinessReport(ready, state, results)

    def _start(self, name: str, check: Check) -> Future[str]:
        future: Future[str] = Future()

        def run() -> None:
            try:
                future.set_result(check())
            except BaseException as error:
                future.set_exception(error)

        self._running[name] = future
        threading.Thread(target=run, name=f"finbot-readyz-{name}", daemon=True).start()
        return future

    def _log_change(self, report: ReadinessReport) -> None:
        # One line when readiness flips, not one per probe.
        if report.state != "serving" or report.ready == self._was_ready:
            return
        self._was_ready = report.ready
        if report.ready:
            logger.info("readiness: ready (%s)", ", ".join(f"{k} {v}" for k, v in report.checks.items()))
        else:
            failing = {k: v for k, v in report.checks.items() if v.startswith("failed")}
            logger.warning("readiness: not ready (%s)", ", ".join(f"{k} {v}" for k, v in failing.items()))


def _short(error: BaseException) -> str:
    name = type(error).__name__
    return f"{name}: {first_line(error)}" if str(error).strip() else name


# ------------------------------------------------------------------------------------ the checks


def engine_check(engine: GenerationEngine, answers: AnswerService | None, max_prompt_tokens: int) -> Check:
    """The engine answers: it produced answer text recently, or it generates one token for a probe."""
    from llm.answering import stream_raw_answer
    from llm.engine import SamplingParams
    from llm.errors import EngineBusyError

    def check() -> str:
        if answers is not None and answers.seconds_since_engine_output() < RECENT_OUTPUT_S:
            return "ok (answering)"
        limit = ENGINE_PROBE_TIMEOUT_S
        cancel = threading.Event()
        # The probe never outlives its readiness check: a stuck engine is not left another request.
        timer = threading.Timer(limit, cancel.set)
        timer.daemon = True
        timer.start()
        started = time.monotonic()
        try:
            generation = stream_raw_answer(
                engine, [], PROBE_QUESTION, SamplingParams(max_new_tokens=1), max_prompt_tokens, cancel
            )
            for _chunk in generation:
                pass
        except EngineBusyError:
            return "ok (busy: queue full)"  # alive and serving others
        finally:
            timer.cancel()
        if cancel.is_set() or time.monotonic() - started > limit:
            raise RuntimeError(f"the engine gave no token within {limit:g} s")
        return "ok"

    return check


def database_check(url: str) -> Check:
    from storage.health import DatabaseProbe

    probe = DatabaseProbe(url)

    def check() -> str:
        probe.check()
        return "ok"

    return check


def slack_check(connected: Callable[[], bool], what: str) -> Check:
    def check() -> str:
        if not connected():
            raise ConnectionError(f"{what} not connected")
        return "ok"

    return check


# ------------------------------------------------------------------------------------ the server


class _Handler(BaseHTTPRequestHandler):
    server: _MonitoringServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            report = self.server.readiness.report()
            self._send(200 if report.ready else 503, report.as_json(), "application/json")
        elif path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(metrics.REGISTRY), content_type)
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        logger.debug("monitoring %s", format % args)


class _MonitoringServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], readiness: Readiness) -> None:
        self.readiness = readiness
        super().__init__(address, _Handler)


class Monitoring:
    """The monitoring endpoints of one `finbot run`; a no-op when METRICS_PORT is 0."""

    def __init__(self, server: _MonitoringServer | None, readiness: Readiness) -> None:
        self._server = server
        self.readiness = readiness

    @property
    def port(self) -> int | None:
        return self._server.server_address[1] if self._server is not None else None

    @classmethod
    def start(cls, settings: FinbotSettings) -> Monitoring:
        readiness = Readiness()
        metrics.process_started(settings.engine)
        if settings.metrics_port == 0:
            logger.info("metrics and health checks are off (METRICS_PORT=0)")
            return cls(None, readiness)
        try:
            server = _MonitoringServer((settings.metrics_host, settings.metrics_port), readiness)
        except OSError as error:
            problem = "is already in use" if error.errno == errno.EADDRINUSE else f"cannot be used ({error.strerror})"
            raise MonitoringPortError(
                f"METRICS_PORT={settings.metrics_port} on METRICS_HOST={settings.metrics_host} {problem}; "
                "choose a free port (1-65535), or METRICS_PORT=0 to switch metrics and health checks off"
            ) from None
        threading.Thread(target=server.serve_forever, name="finbot-monitoring", daemon=True).start()
        logger.info(
            "metrics and health checks on http://%s:%d (/metrics, /healthz, /readyz)",
            settings.metrics_host, server.server_address[1],
        )
        return cls(server, readiness)

    def serving(
        self, settings: FinbotSettings, finbot: Finbot, engine: GenerationEngine, slack_connected: Callable[[], bool]
    ) -> None:
        """Everything is up: report the engine, and let the checks decide readiness from now on."""
        if self._server is None:
            return
        metrics.describe_engine(engine.name)  # "auto" resolved: fast, reference…
        metrics.watch_engine(engine.stats, finbot.answers.pipeline_counts)
        what = "Socket Mode" if settings.slack_mode == "socket" else "HTTP request server"
        self.readiness.add_check("database", database_check(settings.database_url), DATABASE_CHECK_TIMEOUT_S)
        self.readiness.add_check("slack", slack_check(slack_connected, what), 1.0)
        self.readiness.add_check(
            "engine", engine_check(engine, finbot.answers, settings.max_prompt_tokens), ENGINE_PROBE_TIMEOUT_S
        )
        self.readiness.set_state("serving")

    def stopping(self) -> None:
        self.readiness.set_state("stopping")

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
