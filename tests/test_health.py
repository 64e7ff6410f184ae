"""/healthz, /readyz and /metrics in-process (bot/health.py): readiness checks with their time
limits and cache, the engine probe against real engines, and the server over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from bot import health
from bot.health import Monitoring, MonitoringPortError, Readiness, engine_check
from bot.settings import FinbotSettings
from llm.engine import FakeEngine
from llm.errors import GenerationError
from llm.openai_engine import OpenAIEngine, OpenAIEngineConfig


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readiness_is_cached_and_a_hung_check_fails_within_its_limit_without_piling_up():
    calls = {"fast": 0, "hung": 0}
    release = threading.Event()

    def fast() -> str:
        calls["fast"] += 1
        return "ok"

    def hung() -> str:
        calls["hung"] += 1
        release.wait(30)
        return "ok"

    readiness = Readiness(cache_s=0.5)
    assert readiness.report().state == "starting" and not readiness.report().ready
    readiness.add_check("fast", fast, 1.0)
    readiness.add_check("hung", hung, 0.3)
    readiness.set_state("serving")
    started = time.monotonic()
    report = readiness.report()
    assert time.monotonic() - started < 2
    assert not report.ready
    assert report.checks == {"fast": "ok", "hung": "failed: no answer within 0.3 s"}
    assert readiness.report() is report  # cached
    time.sleep(0.6)
    readiness.report()
    assert calls == {"fast": 2, "hung": 1}  # the hung check is still running: not started again
    release.set()
    time.sleep(0.6)
    assert readiness.report().ready
    readiness.set_state("stopping")
    assert readiness.report() == health.ReadinessReport(False, "stopping", {})


def test_the_engine_probe_generates_a_token_and_fails_for_an_engine_that_cannot(mistral_tokenizer, monkeypatch):
    assert engine_check(FakeEngine(mistral_tokenizer, "네 안녕하세요"), None, 256)() == "ok"

    # An OpenAI-compatible server that is not there.
    unreachable = OpenAIEngine(mistral_tokenizer, OpenAIEngineConfig(base_url=f"http://127.0.0.1:{_free_port()}/v1",
                                                                     timeout_s=2, connect_timeout_s=1))
    with pytest.raises(GenerationError):
        engine_check(unreachable, None, 256)()

    # An engine too slow to give one token within the probe's limit.
    monkeypatch.setattr(health, "ENGINE_PROBE_TIMEOUT_S", 0.2)
    slow = FakeEngine(mistral_tokenizer, "느린 답", tokens_per_second=2)
    with pytest.raises(RuntimeError, match="no token within 0.2 s"):
        engine_check(slow, None, 256)()


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_the_monitoring_server_answers_healthz_readyz_metrics_and_refuses_a_taken_port():
    settings = FinbotSettings(_env_file=None, metrics_port=_free_port(), metrics_host="127.0.0.1")
    monitoring = Monitoring.start(settings)
    try:
        port = monitoring.port
        assert _get(port, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
        status, content_type, body = _get(port, "/readyz")
        assert (status, content_type) == (503, "application/json")
        assert json.loads(body) == {"ready": False, "state": "starting", "checks": {}}
        status, content_type, body = _get(port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert "finbot_questions_total{" in body and "finbot_start_time_seconds " in body
        assert _get(port, "/nothing")[0] == 404

        with pytest.raises(MonitoringPortError, match=f"METRICS_PORT={port} .* is already in use.*METRICS_PORT=0"):
            Monitoring.start(settings)
    finally:
        monitoring.close()

    off = Monitoring.start(FinbotSettings(_env_file=None, metrics_port=0))
    assert off.port is None
    off.close()
