"""finbot's Prometheus metrics: one registry, the metric objects, and the hooks that move them.

Served on METRICS_PORT (see bot/health.py) next to /healthz and /readyz. Names follow Prometheus'
conventions (`finbot_` prefix, `_total` counters, `_seconds` durations). Labels only ever carry
small fixed sets of values (outcomes, reasons, Slack API method names, Slack error codes): never
a user's text, a person's id or a channel id, so the number of series stays bounded and nothing
personal leaves through a scrape.

The rest of the bot calls the small functions below (`question_answered`, `question_refused`…)
rather than touching the metric objects, so that what is counted stays in one place. Engine and
GPU figures are read at scrape time (`EngineCollector`), never pushed.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

logger = logging.getLogger(__name__)

# `_created` series double every counter's series and no dashboard of ours needs them.
disable_created_metrics()

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
PlatformCollector(registry=REGISTRY)  # python_info

# What happened to each question, with the reason for refusals and failures.
OUTCOME_REASONS: dict[str, tuple[str, ...]] = {
    "answered": ("",),
    "refused": ("rate_limit", "too_long", "busy", "empty"),
    "failed": ("engine_error", "timeout"),
    # Taken over from a dead or stalled instance and answered again / given up with an apology.
    "recovered": ("",),
    "apologised": ("",),
}

QUESTIONS = Counter(
    "finbot_questions",
    "Questions by outcome: answered; refused (rate_limit, too_long, busy, empty); failed (engine_error, "
    "timeout); recovered (taken over from another instance and answered again); apologised (given up).",
    ["outcome", "reason"],
    registry=REGISTRY,
)
for _outcome, _reasons in OUTCOME_REASONS.items():
    for _reason in _reasons:
        QUESTIONS.labels(_outcome, _reason)  # every series exists from the start, so rate() sees the first one

FIRST_TEXT_SECONDS = Histogram(
    "finbot_first_text_seconds",
    "From the question's arrival to the first answer text visible in Slack (answered questions).",
    buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60),
    registry=REGISTRY,
)
ANSWER_SECONDS = Histogram(
    "finbot_answer_seconds",
    "From the question's arrival to the final answer posted in Slack (answered questions).",
    buckets=(0.5, 1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300),
    registry=REGISTRY,
)
GENERATED_TOKENS = Counter(
    "finbot_generated_tokens", "Tokens of the answers generated for questions.", registry=REGISTRY
)
TOKENS_PER_SECOND = Histogram(
    "finbot_answer_tokens_per_second",
    "Generation speed of each answer: its tokens after the first, over the time from first to last text.",
    buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500),
    registry=REGISTRY,
)
SLACK_CALLS = Counter(
    "finbot_slack_api_calls",
    "Slack Web API calls by method and Slack error code (error=\"none\" for a successful call).",
    ["method", "error"],
    registry=REGISTRY,
)
SLACK_RETRIES = Counter(
    "finbot_slack_api_retries",
    "Slack Web API calls retried, by method and reason (http_5xx status, connection_error, ratelimited).",
    ["method", "reason"],
    registry=REGISTRY,
)
FEEDBACK_VOTES = Counter(
    "finbot_feedback_votes", "👍/👎 clicks on answers (a changed vote counts again).", ["vote"], registry=REGISTRY
)
for _vote in ("up", "down"):
    FEEDBACK_VOTES.labels(_vote)
TERM_OF_DAY_POSTS = Counter(
    "finbot_term_of_day_posts",
    "오늘의 금융용어 per channel and day by outcome: posted, fallback (posted without an explanation), "
    "skipped (already posted or claimed elsewhere), failed.",
    ["outcome"],
    registry=REGISTRY,
)
for _status in ("posted", "fallback", "skipped", "failed"):
    TERM_OF_DAY_POSTS.labels(_status)
START_TIME = Gauge("finbot_start_time_seconds", "When this finbot process started (Unix time).", registry=REGISTRY)
BUILD = Info("finbot_build", "finbot's version and the engine it serves with.", registry=REGISTRY)


@functools.cache
def finbot_version() -> str:
    try:
        return package_version("finbot")
    except PackageNotFoundError:  # running from a checkout that was never pip-installed
        return "unknown"


def process_started(engine: str) -> None:
    """The start time and version; `engine` is the ENGINE setting until the engine is loaded (then its name)."""
    START_TIME.set(time.time())
    describe_engine(engine)


def describe_engine(engine: str) -> None:
    BUILD.info({"version": finbot_version(), "engine": engine})


# ---------------------------------------------------------------------------------------- questions


def question_refused(reason: str) -> None:
    QUESTIONS.labels("refused", reason).inc()


def question_failed(reason: str) -> None:
    QUESTIONS.labels("failed", reason).inc()


def question_recovered() -> None:
    QUESTIONS.labels("recovered", "").inc()


def question_apologised() -> None:
    QUESTIONS.labels("apologised", "").inc()


def question_answered(
    *, first_text_s: float | None, answer_s: float | None, tokens: int, generation_s: float | None
) -> None:
    """One answered question. Durations are None for a question without an arrival time (one taken
    over from another instance: its wait is not this process's to measure). The count moves last:
    whoever sees it moved sees the durations too."""
    if first_text_s is not None:
        FIRST_TEXT_SECONDS.observe(max(first_text_s, 0.0))
    if answer_s is not None:
        ANSWER_SECONDS.observe(max(answer_s, 0.0))
    GENERATED_TOKENS.inc(tokens)
    if generation_s is not None and generation_s > 0 and tokens > 1:
        TOKENS_PER_SECOND.observe((tokens - 1) / generation_s)
    QUESTIONS.labels("answered", "").inc()


# ---------------------------------------------------------------------------------------- Slack


def slack_retry(method: str, reason: str) -> None:
    SLACK_RETRIES.labels(method, reason).inc()


def _slack_error_code(error: BaseException) -> str:
    if isinstance(error, SlackApiError):
        data = error.response.data
        code = data.get("error") if isinstance(data, dict) else None
        return str(code) if code else f"http_{error.response.status_code}"
    return type(error).__name__


class MeteredWebClient(WebClient):
    """A WebClient that counts every Web API call by method and outcome.

    Every method of slack-sdk's WebClient (chat_postMessage, the chat_stream helper's calls…) goes
    through `api_call`, so counting there sees them all; a call its retry handlers retried counts
    once, with its final outcome (the retries have their own counter).
    """

    def api_call(self, api_method: str, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - SlackResponse
        try:
            response = super().api_call(api_method, *args, **kwargs)
        except Exception as error:
            SLACK_CALLS.labels(api_method, _slack_error_code(error)).inc()
            raise
        SLACK_CALLS.labels(api_method, "none").inc()
        return response


def meter_bolt_clients(app: Any) -> None:  # noqa: ANN401 - slack_bolt.App
    """Count the calls of the WebClient Bolt hands to each listener, too.

    Bolt builds a plain WebClient per request from `app.client`'s settings (its retry handlers
    included); it becomes a MeteredWebClient here. The subclass adds no state, only `api_call`
    differs, so switching the instance's class keeps everything Bolt set on it.
    """

    @app.middleware
    def metered_client(context: Any, next: Callable[[], Any]) -> Any:  # noqa: ANN401 - Bolt's types
        client = context.get("client")
        if type(client) is WebClient:
            client.__class__ = MeteredWebClient
        return next()


# ---------------------------------------------------------------------------------------- votes, terms


def feedback_vote(vote: int) -> None:
    FEEDBACK_VOTES.labels("up" if vote > 0 else "down").inc()


def term_of_day_post(outcome: str) -> None:
    TERM_OF_DAY_POSTS.labels(outcome).inc()


# ---------------------------------------------------------------------------------------- read at scrape time


class EngineCollector(Collector):
    """Engine and answer-pipeline gauges, read when Prometheus scrapes.

    `engine_stats` is the engine's `stats()` (queue depth, running requests, KV cache tokens; an
    engine that does not know them returns {}), `pipeline` the answer workers' own counts. GPU
    memory is read from torch only when it is already imported and CUDA already initialised: a
    scrape must never load torch or create a CUDA context.
    """

    def __init__(
        self,
        engine_stats: Callable[[], Mapping[str, float]],
        pipeline: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._engine_stats = engine_stats
        self._pipeline = pipeline

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = dict(self._engine_stats())
        except Exception as error:  # a scrape must not fail because the engine is shutting down
            logger.debug("engine stats unavailable: %s", error)
            stats = {}
        if "queue_depth" in stats:
            yield GaugeMetricFamily(
                "finbot_engine_queue_depth", "Requests waiting in the engine for a batch slot.",
                value=stats["queue_depth"],
            )
        if "running_requests" in stats:
            yield GaugeMetricFamily(
                "finbot_engine_running_requests", "Requests the engine is generating for right now.",
                value=stats["running_requests"],
            )
        used, capacity = stats.get("kv_cache_used_tokens"), stats.get("kv_cache_capacity_tokens")
        if used is not None and capacity:
            yield GaugeMetricFamily(
                "finbot_engine_kv_cache_usage_ratio", "Share of the engine's KV cache in use (0 to 1).",
                value=used / capacity,
            )
            yield GaugeMetricFamily(
                "finbot_engine_kv_cache_capacity_tokens", "Token positions the engine's KV cache holds.",
                value=capacity,
            )
        if self._pipeline is not None:
            family = GaugeMetricFamily(
                "finbot_questions_in_progress",
                "Questions this process holds: waiting for an answer worker, or being answered.",
                labels=["state"],
            )
            for state, count in self._pipeline().items():
                family.add_metric([state], count)
            yield family
        yield from _gpu_memory()


def _gpu_memory() -> Iterator[GaugeMetricFamily]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    allocated = GaugeMetricFamily(
        "finbot_gpu_memory_allocated_bytes", "GPU memory held by tensors, per device.", labels=["device"]
    )
    reserved = GaugeMetricFamily(
        "finbot_gpu_memory_reserved_bytes", "GPU memory reserved by torch's caching allocator, per device.",
        labels=["device"],
    )
    for index in range(torch.cuda.device_count()):
        allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
        reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
    yield allocated
    yield reserved


_collector: EngineCollector | None = None


def watch_engine(
    engine_stats: Callable[[], Mapping[str, float]], pipeline: Callable[[], Mapping[str, int]] | None = None
) -> None:
    """Report this engine (and answer pipeline) from now on; replaces an earlier one."""
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = EngineCollector(engine_stats, pipeline)
    REGISTRY.register(_collector)
