"""The `finbot` command: run the bot, try it in the terminal, check a deployment, migrate the database.

Ordinary mistakes (a wrong setting or argument, a database, Slack, model or folder that cannot be
used, Ctrl-C) end the command with one line on stderr and a non-zero exit status, never a
traceback: see bot/errors.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path

from bot.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    FinbotError,
    describe_database_error,
    first_line,
)
from bot.settings import FinbotSettings

logger = logging.getLogger("finbot")

# Libraries that narrate their work at INFO (Alembic's plugins and migration context, the
# scheduler's jobs, Socket Mode's sessions) or warn about their own internals (deprecations, hub
# retries): quiet unless LOG_LEVEL=DEBUG, so that INFO is finbot's own one line per step.
_CHATTY_LIBRARIES = (
    "alembic", "apscheduler", "slack_bolt", "slack_sdk", "urllib3", "httpx", "httpcore", "filelock",
    "transformers", "huggingface_hub", "peft", "accelerate", "bitsandbytes", "torch", "py.warnings",
)
_OWN_LOGGERS = ("finbot", "bot", "llm", "storage", "migrations", "bench", "__main__")
# Errors a library logs about a failure its caller handles and reports itself (slack-sdk's web client
# logs every failed request before raising it to finbot's retries).
_REDUNDANT_LOGGERS = ("slack_sdk.web.base_client",)


class _ThirdPartyFilter(logging.Filter):
    """Lets finbot's records through; other libraries' only from `level` on.

    A filter on the handler rather than logger levels alone: Bolt sets its loggers' levels from
    the root logger's whenever it creates one, after finbot configured logging.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name.split(".", 1)[0] in _OWN_LOGGERS:
            return True
        if name.startswith(_REDUNDANT_LOGGERS) and self._level > logging.DEBUG:
            return record.levelno >= logging.CRITICAL
        return record.levelno >= self._level


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
    )
    debug = logging.getLogger().level <= logging.DEBUG
    # Python warnings become log records, so that the level decides about them too.
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ThirdPartyFilter(logging.INFO if debug else logging.ERROR))
    for name in _CHATTY_LIBRARIES:
        # Even at DEBUG never below INFO: slack_sdk logs requests, tokens included, at DEBUG.
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.ERROR)
    if not debug:
        warnings.simplefilter("ignore")
        # transformers and huggingface_hub print through their own handlers and progress bars;
        # only their errors are finbot's business (download progress bars stay: they show sizes).
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def say(message: str) -> None:
    """One line for the person at the terminal (stderr, so that stdout stays the command's output)."""
    print(f"finbot: {message}", file=sys.stderr, flush=True)


def build_engine_from(settings: FinbotSettings):  # noqa: ANN201 - llm.engine.GenerationEngine
    from llm.loading import build_engine

    return build_engine(
        settings.engine,
        base_model=settings.base_model,
        adapter=settings.adapter,
        device=settings.device,
        fake_reply=settings.fake_reply,
        fake_tokens_per_second=settings.fake_tokens_per_second,
        fake_fail_on=settings.fake_fail_on,
        max_batch=settings.engine_max_batch or None,
        max_seq_len=settings.engine_max_seq_len,
        max_queue=settings.engine_max_queue,
        cuda_graphs=settings.engine_cuda_graphs,
        compile_kernels=settings.engine_compile_kernels,
        paged_kv=settings.engine_paged_kv,
        kv_cache_tokens=settings.engine_kv_cache_tokens or None,
        nf4_tuning_cache=settings.tuning_cache_path(),
        openai_config=settings.openai_engine_config() if settings.engine == "openai" else None,
    )


def _model_description(settings: FinbotSettings) -> str:
    return f"ENGINE={settings.engine}, BASE_MODEL={settings.base_model}, ADAPTER={settings.adapter}"


def check_engine_device(settings: FinbotSettings) -> None:
    """GPU engines, or DEVICE=cuda, on a machine where torch sees no GPU: said before anything loads."""
    from bot.doctor import GPU_ENGINES, NO_GPU_FIX

    if settings.engine in ("fake", "openai"):
        return
    if settings.engine not in GPU_ENGINES and not settings.device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        what = f"ENGINE={settings.engine}" + (f" with DEVICE={settings.device}" if settings.device != "auto" else "")
        raise FinbotError(f"{what} needs a CUDA GPU, and none is visible ({build}); {NO_GPU_FIX}", EXIT_USAGE)
    index = int(settings.device.split(":")[1]) if settings.device.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        raise FinbotError(f"DEVICE={settings.device}, but only {torch.cuda.device_count()} GPU(s) are visible; "
                          "DEVICE=auto or cuda:0", EXIT_USAGE)


def prepare_model_files(settings: FinbotSettings, *, tokenizer_only: bool = False) -> str:
    """Fail in seconds, naming the alternatives, when the model's files cannot be had (see llm.model_files)."""
    from llm.model_files import (
        ModelFilesError,
        ModelSource,
        describe_sources,
        prepare_sources,
        use_cache_only,
    )

    if tokenizer_only:
        sources = [ModelSource("BASE_MODEL", settings.base_model, "tokenizer")]
    else:
        sources = [ModelSource("BASE_MODEL", settings.base_model, "model"), ModelSource("ADAPTER", settings.adapter, "adapter")]
    import huggingface_hub.constants as hub

    try:
        preparation = prepare_sources(sources, offline=hub.HF_HUB_OFFLINE, endpoint=hub.ENDPOINT)
    except ModelFilesError as error:
        raise FinbotError(f"could not load the model ({_model_description(settings)}): {error}") from None
    if preparation.cache_only and not hub.HF_HUB_OFFLINE:
        os.environ["HF_HUB_OFFLINE"] = "1"  # peft reads the variable itself
        use_cache_only()
    return describe_sources(preparation.statuses)


def check_model_ready(settings: FinbotSettings) -> str:
    """What loading the model needs and can be checked in seconds: a GPU if the engine needs one, the
    files. Returns what will be loaded, for the log line when loading starts."""
    check_engine_device(settings)
    if settings.engine != "fake":
        files = prepare_model_files(settings, tokenizer_only=settings.engine == "openai")
        # The GPU engines warm up (CUDA graphs, kernels) before they are ready: part of this step.
        warm_up = "; then warm-up" if settings.engine in ("fast", "low-memory", "nf4") else ""
        return f"ENGINE={settings.engine}, {files}{warm_up}"
    if Path(settings.base_model).expanduser().is_dir():
        return f"ENGINE=fake, template answers, the tokenizer of {settings.base_model}"
    return "ENGINE=fake, template answers, Mistral's v1 tokenizer from mistral-common (no download)"


def load_engine_or_explain(  # noqa: ANN201 - GenerationEngine
    settings: FinbotSettings, *, require_openai_server: bool = False, checked: str | None = None
):
    """The engine, ready; raises `FinbotError` (one line) when the model cannot be loaded.

    `require_openai_server`: with ENGINE=openai, a server that does not answer is an error (the
    terminal commands); `finbot run` only warns, its users get an apology until the server is up.
    `checked`: what `check_model_ready` returned, when it already ran.
    """
    loading = checked or check_model_ready(settings)
    if settings.engine == "openai":
        from bot.doctor import probe_openai_server

        problem, _ = probe_openai_server(settings)
        if problem is not None:
            message = (
                f"the inference server at OPENAI_BASE_URL={settings.openai_base_url} is not answering ({problem}); "
                "start it (README: vllm serve …) or fix OPENAI_BASE_URL / OPENAI_MODEL"
            )
            if require_openai_server:
                raise FinbotError(message)
            logger.warning("%s; questions get an apology until it answers", message)
    logger.info("loading the model: %s", loading)
    try:
        return build_engine_from(settings)
    except (OSError, ValueError, ImportError) as error:  # missing or broken files, a bad setting
        raise FinbotError(f"could not load the model ({_model_description(settings)}): {first_line(error)}") from None
    except RuntimeError as error:
        if "out of memory" not in str(error).lower():
            raise
        from bot.doctor import gpu_memory_advice, gpu_memory_need
        from llm.loading import resolve_device, resolve_engine

        served = resolve_engine(settings.engine, resolve_device(settings.device))  # auto: nf4 on a small GPU
        advice = gpu_memory_advice(gpu_memory_need(served, settings.engine_paged_kv))
        raise FinbotError(
            f"not enough GPU memory to load the model ({_model_description(settings)}): {first_line(error)}; "
            f"{advice} (see finbot doctor)"
        ) from None


def migrate_database(settings: FinbotSettings, revision: str = "head", *, announce: bool = True) -> None:
    """Bring the database to `revision`; one INFO line with where it is (`announce`), one line if it fails."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from storage.db import current_revision, upgrade_database

    url = settings.database_url
    try:
        before = current_revision(url)
        upgrade_database(url, revision)
        after = current_revision(url)
    except (SQLAlchemyError, CommandError, OSError) as error:
        raise FinbotError(describe_database_error(url, error)) from None
    if before != after:
        logger.info("database migrated from %s to revision %s", before or "empty", after)
    elif announce:
        logger.info("database at revision %s", after)


def known_revisions(settings: FinbotSettings) -> list[str]:
    from alembic.script import ScriptDirectory

    from storage.db import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config(settings.database_url))
    return sorted(script.revision for script in scripts.walk_revisions())


def command_db_upgrade(settings: FinbotSettings, revision: str) -> int:
    known = known_revisions(settings)
    if revision not in (*known, "head", "heads"):
        raise FinbotError(
            f"REVISION {revision} is unknown; this finbot knows {', '.join(known)} (or head, the default)", EXIT_USAGE
        )
    migrate_database(settings, revision)
    return 0


def command_ask(settings: FinbotSettings, question: str) -> int:
    """One question, answered through the Slack pipeline (shown as it is written on a terminal)."""
    from bot import messages_ko
    from bot.chat import TerminalAnswerer, TerminalView, for_terminal

    if not question.strip():
        raise FinbotError(for_terminal(messages_ko.ASK_EMPTY), EXIT_USAGE)
    engine = load_engine_or_explain(settings, require_openai_server=True)
    view = TerminalView(sys.stdout, interactive=sys.stdout.isatty())
    try:
        answerer = TerminalAnswerer(
            engine, settings.sampling_params(), settings.max_prompt_tokens, settings.generation_timeout_s
        )
        reply = answerer.answer([], question, view)
    finally:
        engine.close()
    if reply.answer is None:
        view.clear()
        print(for_terminal(reply.notice or messages_ko.GENERATION_FAILED), file=sys.stderr)
        return EXIT_USAGE if reply.too_long else EXIT_FAILED
    view.finish(reply.answer)
    return 0


def command_chat(settings: FinbotSettings) -> int:
    """A conversation in the terminal: one thread per session, stored like a Slack thread."""
    from bot.chat import TerminalAnswerer, TerminalChat
    from storage.conversations import ConversationStore
    from storage.db import open_database

    migrate_database(settings, announce=False)
    engine = load_engine_or_explain(settings, require_openai_server=True)
    try:
        if sys.stdin.isatty():
            import readline  # noqa: F401 - line editing and history for input(), Hangul included
        answerer = TerminalAnswerer(
            engine, settings.sampling_params(), settings.max_prompt_tokens, settings.generation_timeout_s
        )
        chat = TerminalChat(
            ConversationStore(open_database(settings.database_url)), answerer,
            out=sys.stdout, interactive=sys.stdout.isatty(),
        )
        return chat.run(engine.name)
    finally:
        engine.close()


def command_export_merged(settings: FinbotSettings, out_dir: str) -> int:
    from llm.export import export_merged

    out = ensure_writable_folder(out_dir, "OUT_DIR")  # before minutes of loading, not after
    check_engine_device(settings)
    prepare_model_files(settings)
    try:
        export_merged(settings.base_model, settings.adapter, str(out), device=settings.device)
    except OSError as error:
        raise FinbotError(f"could not write the merged model to OUT_DIR {out}: {error.strerror or first_line(error)}") from None
    return 0


def ensure_writable_folder(folder: str, name: str) -> Path:
    """`folder`, created if needed, after checking a file can be written in it."""
    import tempfile

    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise FinbotError(f"{name} {folder} is a file, not a folder", EXIT_USAGE)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".finbot-write-test-"):
            pass
    except OSError as error:
        raise FinbotError(f"cannot write in {name} {folder}: {error.strerror or first_line(error)}") from None
    return path


def command_run(settings: FinbotSettings) -> int:
    from bot.app import build_app
    from bot.health import Monitoring, MonitoringPortError
    from bot.recovery import RecoveryLoop, shut_down
    from bot.slack_check import wait_for_slack

    if missing := settings.missing_slack_settings():
        logger.error("cannot start: %s not set (see .env.example)", ", ".join(missing))
        return 2
    try:
        # /healthz answers from here on (while Slack is waited for and the model loads); /readyz
        # once everything is up. A taken port stops the start before any of that.
        monitoring = Monitoring.start(settings)
    except MonitoringPortError as error:
        logger.error("cannot start: %s", error)
        return 2
    # Before minutes of model loading, the checks that take seconds: the model's files are there (or
    # the reason they are not), a refused token stops here, an unreachable Slack is waited for.
    model = check_model_ready(settings)
    identity = wait_for_slack(settings)
    logger.info("Slack: signed in as @%s in %s (%s)", identity.user, identity.team, identity.team_id)
    migrate_database(settings)
    engine = load_engine_or_explain(settings, checked=model)
    if engine is None:
        return 1
    finbot = build_app(settings, engine)
    stop = threading.Event()
    scheduler = build_scheduler(settings, finbot)

    received: list[int] = []

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        received.append(signum)
        monitoring.stopping()
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    recovery: RecoveryLoop | None = None
    if finbot.answers.leases is not None:
        recovery = RecoveryLoop(
            finbot.answers.leases,
            finbot.answers,
            finbot.app.client,
            max_age=timedelta(minutes=settings.recovery_max_age_minutes),
            max_attempts=settings.recovery_max_attempts,
            legacy_min_age=timedelta(seconds=settings.recovery_min_age_s),
            interval_s=settings.question_lease_s / 3,
        )
        # The first pass runs now: questions a killed or stopped process left are answered at once.
        recovery.tick()
        recovery.start()

    if settings.slack_mode == "socket":
        from slack_bolt.adapter.socket_mode import SocketModeHandler

        assert settings.slack_app_token is not None  # checked by missing_slack_settings above
        handler = SocketModeHandler(
            finbot.app, settings.slack_app_token.get_secret_value(), web_client=finbot.app.client
        )
        handler.connect()
        scheduler.start()
        monitoring.serving(settings, finbot, engine, slack_connected=handler.client.is_connected)
        logger.info("finbot is ready (Socket Mode, engine %s)", engine.name)
        wait_for_stop(stop)
        close_socket_mode(handler, SOCKET_MODE_DRAIN_S)
    else:
        server = make_http_server(finbot.app, settings.http_host, settings.http_port)
        http_thread = threading.Thread(target=server.serve_forever, daemon=True, name="finbot-http")
        http_thread.start()
        scheduler.start()
        monitoring.serving(settings, finbot, engine, slack_connected=http_thread.is_alive)
        logger.info("finbot is ready (HTTP mode on %s:%d, engine %s)", settings.http_host, settings.http_port, engine.name)
        wait_for_stop(stop)
        server.shutdown()  # no new requests; questions already taken are finished below
    scheduler.shutdown(wait=True)
    shut_down(finbot.answers, recovery, settings.shutdown_deadline_s)
    engine.close()
    monitoring.close()
    logger.info("finbot stopped")
    # Stopped with Ctrl-C: the status a shell expects of an interrupted command.
    return EXIT_INTERRUPTED if received[:1] == [signal.SIGINT] else 0


def wait_for_stop(stop: threading.Event) -> None:
    """Until a stop is requested. In short waits: the kernel may hand SIGTERM to any of the process's
    threads, and Python runs its handler only once the main thread wakes up, which a wait without a
    timeout never does (seen in tests: a SIGTERM ignored until SIGKILL)."""
    while not stop.wait(timeout=0.25):
        pass


# On SIGTERM, how long the events already taken off the Socket Mode connection get to be acknowledged
# (a listener acks within Slack's 3 s; answering happens elsewhere) before it closes anyway.
SOCKET_MODE_DRAIN_S = 5.0


def close_socket_mode(handler, drain_s: float) -> None:  # noqa: ANN001 - slack_bolt SocketModeHandler
    """Close the Socket Mode connection only after the events already taken in are acknowledged over it.

    Closed at once, a listener still running (a slash command just answered, a mention being saved)
    fails to send its ack: Slack shows the user a timeout for a command and the operator's log gets
    slack_bolt's traceback. So: take no new envelopes off the connection, let the running listeners
    finish, then close. Events Slack has no ack for it sends again (to this instance after a restart or
    to another one); a command or a click received just before SIGTERM but not yet handed to a
    listener times out for its user, as it would with any stop."""
    client = handler.client
    client.closed = True  # the message processor's loop ends after its current 1 s wait
    processor = getattr(client, "message_processor", None)
    if processor is not None:
        processor.shutdown()
    left = client.message_queue.qsize() if hasattr(client, "message_queue") else 0
    workers = getattr(client, "message_workers", None)
    if workers is not None:
        drained = threading.Event()

        def drain() -> None:
            workers.shutdown(wait=True)
            drained.set()

        threading.Thread(target=drain, name="finbot-socket-drain", daemon=True).start()
        if not drained.wait(drain_s):
            logger.warning("Socket Mode: events still being acknowledged after %.0f s; closing anyway", drain_s)
    if left:
        logger.warning("Socket Mode: %d envelope(s) received but not taken in before closing: Slack retries the "
                       "events among them; commands or clicks among them time out for their users", left)
    handler.close()


def make_http_server(app, host: str, port: int):  # noqa: ANN001, ANN201 - slack_bolt.App -> WSGIServer
    """A threaded WSGI server for Slack's requests on /slack/events (signatures verified by Bolt).

    Bolt's own `App.start` is a development server that cannot bind a chosen interface or be
    stopped; the standard library's WSGI server with one thread per request can.
    """
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from slack_bolt.adapter.wsgi import SlackRequestHandler

    class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietRequestHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            logger.debug("http %s", format % args)

    return make_server(
        host, port, SlackRequestHandler(app, path="/slack/events"),
        server_class=ThreadingWSGIServer, handler_class=QuietRequestHandler,
    )


def build_scheduler(settings: FinbotSettings, finbot):  # noqa: ANN001, ANN201 - bot.app.Finbot -> FinbotScheduler
    """The background scheduler with every scheduled feature's jobs (started by command_run)."""
    from bot.scheduler import FinbotScheduler
    from bot.term_of_day import schedule_term_of_day
    from storage.retention import schedule_retention

    scheduler = FinbotScheduler(settings.timezone)
    schedule_retention(
        scheduler, finbot.session_factory,
        settings.retention_days, settings.processed_event_retention_days,
    )
    if finbot.term_of_day is not None:
        schedule_term_of_day(scheduler, finbot.term_of_day)
    return scheduler


def command_term_today(settings: FinbotSettings, dry_run: bool) -> int:
    """Post today's term in every TERM_OF_DAY_CHANNELS channel now (same claim: never twice a day)."""

    from bot.app import build_term_of_day
    from bot.business_days import holiday_name
    from storage.conversations import ConversationStore
    from storage.db import open_database

    migrate_database(settings, announce=False)
    from bot.app import build_web_client

    client = build_web_client(settings)  # the bot's own retries on Slack's server errors
    # No engine yet: a dry run never generates, and on a day off the model need not be loaded.
    service = build_term_of_day(settings, None, ConversationStore(open_database(settings.database_url)), client)
    # The channels in force: an admin's choice in the Home tab, else TERM_OF_DAY_CHANNELS.
    channels = service.config.channels
    if not channels and not dry_run:
        raise FinbotError(
            "TERM_OF_DAY_CHANNELS is empty (and no channels were set in the Home tab): no channel to post in. "
            "Set it to channel IDs (see .env.example), or see today's term with: finbot term today --dry-run",
            EXIT_USAGE,
        )
    today = service.current_time().date()
    posting_day = service.is_posting_day(today)
    if dry_run:
        if not posting_day:
            print(f"{today}: not a posting day ({holiday_name(today) or 'weekend'}); nothing would be posted")
        if not channels:
            # The choice avoids a channel's earlier terms; a channel with none yet gets this one.
            term = service.choose_term("", today)
            print(f"{today}: would post {term.term} ({term.category})")
            say("TERM_OF_DAY_CHANNELS is empty, so nothing is posted until it is set (see .env.example)")
            return 0
        for channel in channels:
            existing = service.posts.get(channel, today)
            if existing is not None:
                print(f"{today} {channel}: already {existing.status}: {existing.term} ({existing.category})")
                continue
            term = service.choose_term(channel, today)
            print(f"{today} {channel}: would post {term.term} ({term.category})")
        return 0
    if not posting_day:
        raise FinbotError(f"{today} is not a posting day ({holiday_name(today) or 'weekend'}); nothing posted")
    if settings.slack_bot_token is None:
        raise FinbotError("SLACK_BOT_TOKEN is not set (see .env.example)", EXIT_USAGE)
    engine = load_engine_or_explain(settings)
    service.engine = engine
    try:
        outcomes = service.post_today()
    finally:
        engine.close()
    for outcome in outcomes:
        detail = f" ({outcome.reason})" if outcome.reason else ""
        print(f"{outcome.day} {outcome.channel_id}: {outcome.status} {outcome.term or ''} {outcome.slack_ts or ''}{detail}")
    return 1 if any(outcome.status == "failed" for outcome in outcomes) else 0


def command_term_history(settings: FinbotSettings, channel: str | None, limit: int) -> int:
    from bot import messages_ko
    from storage.db import open_database
    from storage.term_posts import TermPostStore

    migrate_database(settings, announce=False)
    posts = TermPostStore(open_database(settings.database_url)).history(channel, limit)
    if not posts:
        print(messages_ko.TERM_HISTORY_EMPTY_IN_CHANNEL.format(channel=channel) if channel else messages_ko.TERM_HISTORY_EMPTY)
    for post in posts:
        note = f"  [{post.error}]" if post.error else ""
        print(f"{post.post_date}  {post.channel_id}  {post.status:<7}  {post.term} ({post.category})  {post.slack_ts or '-'}{note}")
    return 0


def _settings_today(settings: FinbotSettings) -> date:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    return datetime.now(ZoneInfo(settings.timezone)).date()


def _not_posted_because(settings: FinbotSettings, day: date) -> str | None:
    """Why nothing is posted on `day` with these settings (a weekend, a holiday), or None."""
    from bot.business_days import holiday_name, is_business_day

    if is_business_day(
        day,
        include_weekends=settings.term_of_day_include_weekends,
        include_holidays=settings.term_of_day_include_holidays,
    ):
        return None
    holiday = holiday_name(day)
    if holiday and not settings.term_of_day_include_holidays:
        return f"a public holiday ({holiday}; TERM_OF_DAY_INCLUDE_HOLIDAYS=false)"
    return "a weekend (TERM_OF_DAY_INCLUDE_WEEKENDS=false)"


def command_term_pin(settings: FinbotSettings, pin_date: date, term: str) -> int:
    from bot.term_catalog import find_term, load_terms
    from storage.db import open_database
    from storage.term_posts import TermPostStore

    migrate_database(settings, announce=False)
    posts = TermPostStore(open_database(settings.database_url))
    posts.pin(pin_date, term)
    found = find_term(load_terms(), term)
    if found is None:
        print(f"note: {term!r} is not in the catalog; it will be posted with category 기타")
    if pin_date < _settings_today(settings):
        say(f"warning: {pin_date} is in the past; the pin is saved, but nothing will be posted for that day")
    elif reason := _not_posted_because(settings, pin_date):
        say(f"warning: {pin_date} is {reason}: nothing is posted that day, so the pin will not be used")
    already = posts.posts_on(pin_date)
    if already:
        print(f"note: {len(already)} channel(s) already claimed {pin_date}; the pin applies only to the others")
    print(f"pinned {found.term if found else term} for {pin_date}")
    return 0


def command_term_pins(settings: FinbotSettings, include_past: bool) -> int:
    from bot import messages_ko
    from storage.db import open_database
    from storage.term_posts import TermPostStore

    migrate_database(settings, announce=False)
    today = _settings_today(settings)
    pins = TermPostStore(open_database(settings.database_url)).pins_from(date.min if include_past else today, 10_000)
    if not pins:
        print(messages_ko.TERM_PINS_EMPTY)
    for day, term in pins:
        notes = []
        if day < today:
            notes.append("past")
        elif reason := _not_posted_because(settings, day):
            notes.append(f"not posted: {reason.split(' (')[0]}")
        print(f"{day}  {term}" + (f"  ({'; '.join(notes)})" if notes else ""))
    return 0


def command_term_unpin(settings: FinbotSettings, pin_date: date) -> int:
    from storage.db import open_database
    from storage.term_posts import TermPostStore

    migrate_database(settings, announce=False)
    posts = TermPostStore(open_database(settings.database_url))
    term = posts.pinned_term(pin_date)
    if term is None or not posts.unpin(pin_date):
        raise FinbotError(f"{pin_date}에 고정된 용어가 없어요 (finbot term pins 로 목록을 볼 수 있어요)")
    print(f"unpinned {term} from {pin_date}; that day's term is chosen from the catalog again")
    return 0


def command_feedback_export(settings: FinbotSettings, output: str) -> int:
    """Write every 👍/👎 vote with its question and answer as JSON lines (for evaluating the model)."""
    from storage.db import open_database
    from storage.feedback import FeedbackStore

    if output != "-":
        # Opened first: a folder that does not exist or cannot be written is said before any work.
        try:
            out = open(output, "w", encoding="utf-8")  # noqa: SIM115 - closed below, after the export
        except OSError as error:
            hint = " (give a file name)" if Path(output).is_dir() else ""
            raise FinbotError(f"cannot write --output {output}: {error.strerror or first_line(error)}{hint}") from None
    try:
        migrate_database(settings, announce=False)
        store = FeedbackStore(open_database(settings.database_url))
        count = store.export_jsonl(sys.stdout if output == "-" else out)
    finally:
        if output != "-":
            out.close()
    logger.info("exported %d feedback vote(s) to %s", count, "stdout" if output == "-" else output)
    return 0


def _date_argument(text: str) -> date:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: write it as YYYY-MM-DD, e.g. 2025-03-14") from None


def _term_argument(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the term is empty: e.g. finbot term pin 2025-03-14 기준금리")
    return text.strip()


def _limit_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 1, e.g. --limit 20")
    return value


def _channel_argument(text: str) -> str:
    if not re.fullmatch(r"[A-Z0-9]+", text.strip()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a channel ID: use the ID shown at the bottom of the channel's details, e.g. C0123ABCD"
        )
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finbot",
        description="Korean finance assistant for Slack. Try it without Slack: ENGINE=fake finbot chat",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", help="connect to Slack and answer questions", description="Migrate the database, "
                        "check the Slack tokens, load the model and answer in Slack until stopped (SIGTERM, Ctrl-C).")
    ask = commands.add_parser("ask", help="answer one question in the terminal, without Slack")
    ask.add_argument("question", metavar="QUESTION", help='the question, in quotes, e.g. "기준금리가 뭐야?"')
    commands.add_parser(
        "chat", help="a conversation in the terminal through the bot's pipeline (/new, /quit)",
        description="Ask questions one after another; finbot remembers the conversation like a Slack thread. "
        "/new starts a new conversation, /quit or Ctrl-D leaves, Ctrl-C stops an answer.",
    )
    commands.add_parser("doctor", help="check settings, database, Slack, GPU, model files and channels",
                        description="Prints one row per check (✔/✘/–) with the fix; exit status 1 when anything fails.")
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser("upgrade", help="apply migrations")
    upgrade.add_argument("revision", nargs="?", default="head", metavar="REVISION",
                         help="the revision to migrate to (default: head, the latest)")
    term = commands.add_parser("term", help="오늘의 금융용어 (term of the day)")
    term_commands = term.add_subparsers(dest="term_command", required=True, metavar="COMMAND")
    today = term_commands.add_parser("today", help="post today's term now (once per channel per day)")
    today.add_argument("--dry-run", action="store_true",
                       help="only show what would be posted (needs no model, no Slack and no channel)")
    history = term_commands.add_parser("history", help="list posted terms, newest first")
    history.add_argument("--channel", metavar="CHANNEL_ID", type=_channel_argument,
                         help="only this channel's posts (its ID, e.g. C0123ABCD)")
    history.add_argument("--limit", metavar="N", type=_limit_argument, default=50,
                         help="show at most N posts (default 50)")
    pin = term_commands.add_parser("pin", help="choose the term for a date")
    pin.add_argument("date", metavar="DATE", type=_date_argument, help="the day, as YYYY-MM-DD")
    pin.add_argument("term", metavar="TERM", type=_term_argument,
                     help="the term, e.g. 기준금리 (one outside the catalog is posted as 기타)")
    pins = term_commands.add_parser("pins", help="list pinned terms, from today on")
    pins.add_argument("--all", action="store_true", dest="include_past", help="include pins of past days")
    unpin = term_commands.add_parser("unpin", help="remove the pin of a date")
    unpin.add_argument("date", metavar="DATE", type=_date_argument, help="the pinned day, as YYYY-MM-DD")
    export = commands.add_parser(
        "export-merged", help="write the merged bf16 checkpoint (base + LoRA, safetensors, tokenizer) for vLLM"
    )
    export.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the checkpoint to (created if missing)")
    feedback = commands.add_parser("feedback", help="👍/👎 votes on answers")
    feedback_commands = feedback.add_subparsers(dest="feedback_command", required=True, metavar="COMMAND")
    feedback_export = feedback_commands.add_parser("export", help="write every vote as JSONL")
    feedback_export.add_argument("--output", "-o", default="-", metavar="FILE", help="file to write (default: stdout)")
    # A missing command is then reported with the commands to choose from, not an internal name.
    for group in (commands, db_commands, term_commands, feedback_commands):
        group.metavar = "{" + ",".join(group.choices) + "}"
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_settings() -> FinbotSettings:
    """The settings, or `FinbotError` listing every invalid one (variable, value, what is allowed)."""
    from pydantic import ValidationError

    from bot.errors import describe_settings_error

    try:
        return FinbotSettings()
    except ValidationError as error:
        lines = describe_settings_error(error)
        where = " (set in the environment or .env; see .env.example)"
        raise FinbotError("\nfinbot: ".join(lines) + where, EXIT_USAGE) from None


def run_command(args: argparse.Namespace) -> int:
    if args.command == "doctor":
        from bot.doctor import command_doctor

        # The doctor reports invalid settings in its table rather than stopping at them.
        configure_logging("WARNING")
        return command_doctor(sys.stdout)
    settings = load_settings()
    configure_logging(settings.log_level)
    try:
        return dispatch(args, settings)
    except Exception as error:
        from alembic.util.exc import CommandError
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(error, SQLAlchemyError | CommandError):  # after the start-up checks: still one line
            raise FinbotError(describe_database_error(settings.database_url, error)) from None
        raise


def dispatch(args: argparse.Namespace, settings: FinbotSettings) -> int:
    if args.command == "db":
        return command_db_upgrade(settings, args.revision)
    if args.command == "ask":
        return command_ask(settings, args.question)
    if args.command == "chat":
        return command_chat(settings)
    if args.command == "export-merged":
        return command_export_merged(settings, args.out_dir)
    if args.command == "feedback":
        return command_feedback_export(settings, args.output)
    if args.command == "term":
        if args.term_command == "today":
            return command_term_today(settings, args.dry_run)
        if args.term_command == "history":
            return command_term_history(settings, args.channel, args.limit)
        if args.term_command == "pins":
            return command_term_pins(settings, args.include_past)
        if args.term_command == "unpin":
            return command_term_unpin(settings, args.date)
        return command_term_pin(settings, args.date, args.term)
    return command_run(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """The `finbot` command; an ordinary mistake ends it with one line and a non-zero status."""
    # Ctrl-C stops an answer in the terminal, and any command ends on it with one line (below). A
    # process started with SIGINT ignored (a script's background job, some CI runners and IDE
    # consoles) would keep it ignored and never see KeyboardInterrupt: Python's handler goes back.
    # (`finbot run` installs its own, for a graceful stop.)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = parse_args(argv)
        return run_command(args)
    except FinbotError as error:
        say(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        # One line, not a traceback from wherever Ctrl-C happened to land.
        print(file=sys.stderr)
        say("interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `finbot term history | head`): nothing left to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
