"""The `finbot` command: run the bot, ask a question from the terminal, migrate the database."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta

from bot.settings import FinbotSettings

logger = logging.getLogger("finbot")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
    )
    # slack_sdk logs request details at DEBUG; keep tokens out of logs whatever the level.
    for noisy in ("slack_sdk", "slack_bolt", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.getLogger().level, logging.INFO))


def build_engine_from(settings: FinbotSettings):  # noqa: ANN201 - llm.engine.GenerationEngine
    from llm.loading import build_engine

    return build_engine(
        settings.engine,
        base_model=settings.base_model,
        adapter=settings.adapter,
        device=settings.device,
        fake_reply=settings.fake_reply,
        fake_tokens_per_second=settings.fake_tokens_per_second,
        max_batch=settings.engine_max_batch or None,
        max_seq_len=settings.engine_max_seq_len,
        max_queue=settings.engine_max_queue,
        cuda_graphs=settings.engine_cuda_graphs,
        compile_kernels=settings.engine_compile_kernels,
        paged_kv=settings.engine_paged_kv,
        kv_cache_tokens=settings.engine_kv_cache_tokens or None,
        openai_config=settings.openai_engine_config() if settings.engine == "openai" else None,
    )


def load_engine_or_explain(settings: FinbotSettings):  # noqa: ANN201 - GenerationEngine | None
    """The engine, or None after telling the operator why the model could not be loaded."""
    try:
        return build_engine_from(settings)
    except (OSError, ValueError) as error:  # missing files, no hub access, a bad setting
        logger.error(
            "could not load the model (ENGINE=%s, BASE_MODEL=%s, ADAPTER=%s): %s",
            settings.engine, settings.base_model, settings.adapter, error,
        )
        return None


def command_db_upgrade(settings: FinbotSettings, revision: str) -> int:
    from storage.db import current_revision, upgrade_database

    upgrade_database(settings.database_url, revision)
    logger.info("database at revision %s", current_revision(settings.database_url))
    return 0


def command_ask(settings: FinbotSettings, question: str) -> int:
    from llm.answering import answer_question
    from llm.errors import PromptTooLongError

    engine = load_engine_or_explain(settings)
    if engine is None:
        return 1
    try:
        answer = answer_question(engine, [], question, settings.sampling_params(), settings.max_prompt_tokens)
    except PromptTooLongError:
        from bot import messages_ko

        print(messages_ko.QUESTION_TOO_LONG, file=sys.stderr)
        return 2
    print(answer)
    return 0


def command_run(settings: FinbotSettings) -> int:
    from bot.app import build_app
    from bot.recovery import RecoveryLoop, shut_down
    from storage.db import upgrade_database

    if missing := settings.missing_slack_settings():
        logger.error("cannot start: %s not set (see .env.example)", ", ".join(missing))
        return 2
    upgrade_database(settings.database_url)
    engine = load_engine_or_explain(settings)
    if engine is None:
        return 1
    finbot = build_app(settings, engine)
    stop = threading.Event()
    scheduler = build_scheduler(settings, finbot)

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
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
        logger.info("finbot is ready (Socket Mode, engine %s)", engine.name)
        stop.wait()
        handler.close()
    else:
        server = make_http_server(finbot.app, settings.http_host, settings.http_port)
        threading.Thread(target=server.serve_forever, daemon=True, name="finbot-http").start()
        scheduler.start()
        logger.info("finbot is ready (HTTP mode on %s:%d, engine %s)", settings.http_host, settings.http_port, engine.name)
        stop.wait()
        server.shutdown()  # no new requests; questions already taken are finished below
    scheduler.shutdown(wait=True)
    shut_down(finbot.answers, recovery, settings.shutdown_deadline_s)
    engine.close()
    logger.info("finbot stopped")
    return 0


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
    from slack_sdk import WebClient

    from bot.app import build_term_of_day
    from bot.business_days import holiday_name
    from storage.conversations import ConversationStore
    from storage.db import open_database, upgrade_database

    channels = settings.term_of_day_channel_ids()
    if not channels:
        print("TERM_OF_DAY_CHANNELS is empty: no channel to post in (see .env.example)", file=sys.stderr)
        return 2
    upgrade_database(settings.database_url)
    token = settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None
    client = WebClient(token=token, base_url=settings.slack_api_url)
    # No engine yet: a dry run never generates, and on a day off the model need not be loaded.
    service = build_term_of_day(settings, None, ConversationStore(open_database(settings.database_url)), client)
    today = service.current_time().date()
    posting_day = service.is_posting_day(today)
    if dry_run:
        if not posting_day:
            print(f"{today}: not a posting day ({holiday_name(today) or 'weekend'}); nothing would be posted")
        for channel in channels:
            existing = service.posts.get(channel, today)
            if existing is not None:
                print(f"{today} {channel}: already {existing.status}: {existing.term} ({existing.category})")
                continue
            term = service.choose_term(channel, today)
            print(f"{today} {channel}: would post {term.term} ({term.category})")
        return 0
    if not posting_day:
        print(f"{today} is not a posting day ({holiday_name(today) or 'weekend'}); nothing posted", file=sys.stderr)
        return 1
    if token is None:
        print("SLACK_BOT_TOKEN is not set (see .env.example)", file=sys.stderr)
        return 2
    engine = build_engine_from(settings)
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
    from storage.db import open_database, upgrade_database
    from storage.term_posts import TermPostStore

    upgrade_database(settings.database_url)
    posts = TermPostStore(open_database(settings.database_url))
    for post in posts.history(channel, limit):
        note = f"  [{post.error}]" if post.error else ""
        print(f"{post.post_date}  {post.channel_id}  {post.status:<7}  {post.term} ({post.category})  {post.slack_ts or '-'}{note}")
    return 0


def command_term_pin(settings: FinbotSettings, day: str, term: str) -> int:
    from datetime import date

    from bot.term_catalog import find_term, load_terms
    from storage.db import open_database, upgrade_database
    from storage.term_posts import TermPostStore

    try:
        pin_date = date.fromisoformat(day)
    except ValueError:
        print(f"not a date: {day!r} (expected YYYY-MM-DD)", file=sys.stderr)
        return 2
    if not term.strip():
        print("the term is empty", file=sys.stderr)
        return 2
    upgrade_database(settings.database_url)
    posts = TermPostStore(open_database(settings.database_url))
    posts.pin(pin_date, term.strip())
    found = find_term(load_terms(), term)
    if found is None:
        print(f"note: {term!r} is not in the catalog; it will be posted with category 기타")
    already = posts.posts_on(pin_date)
    if already:
        print(f"note: {len(already)} channel(s) already claimed {pin_date}; the pin applies only to the others")
    print(f"pinned {found.term if found else term.strip()} for {pin_date}")
    return 0


def command_feedback_export(settings: FinbotSettings, output: str) -> int:
    """Write every 👍/👎 vote with its question and answer as JSON lines (for evaluating the model)."""
    from storage.db import open_database, upgrade_database
    from storage.feedback import FeedbackStore

    upgrade_database(settings.database_url)
    store = FeedbackStore(open_database(settings.database_url))
    if output == "-":
        count = store.export_jsonl(sys.stdout)
    else:
        with open(output, "w", encoding="utf-8") as out:
            count = store.export_jsonl(out)
    logger.info("exported %d feedback vote(s) to %s", count, "stdout" if output == "-" else output)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finbot", description="Korean finance assistant for Slack")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="connect to Slack and answer questions")
    ask = commands.add_parser("ask", help="answer one question in the terminal, without Slack")
    ask.add_argument("question")
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="apply migrations")
    upgrade.add_argument("revision", nargs="?", default="head")
    term = commands.add_parser("term", help="오늘의 금융용어 (term of the day)")
    term_commands = term.add_subparsers(dest="term_command", required=True)
    today = term_commands.add_parser("today", help="post today's term now (once per channel per day)")
    today.add_argument("--dry-run", action="store_true", help="only show what would be posted")
    history = term_commands.add_parser("history", help="list posted terms, newest first")
    history.add_argument("--channel")
    history.add_argument("--limit", type=int, default=50)
    pin = term_commands.add_parser("pin", help="choose the term for a date")
    pin.add_argument("date", help="YYYY-MM-DD")
    pin.add_argument("term")
    export = commands.add_parser(
        "export-merged", help="write the merged bf16 checkpoint (base + LoRA, safetensors, tokenizer) for vLLM"
    )
    export.add_argument("out_dir")
    feedback = commands.add_parser("feedback", help="👍/👎 votes on answers")
    feedback_commands = feedback.add_subparsers(dest="feedback_command", required=True)
    feedback_export = feedback_commands.add_parser("export", help="write every vote as JSONL")
    feedback_export.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = FinbotSettings()
    configure_logging(settings.log_level)
    if args.command == "db":
        return command_db_upgrade(settings, args.revision)
    if args.command == "ask":
        return command_ask(settings, args.question)
    if args.command == "export-merged":
        from llm.export import export_merged

        export_merged(settings.base_model, settings.adapter, args.out_dir, device=settings.device)
        return 0
    if args.command == "feedback":
        return command_feedback_export(settings, args.output)
    if args.command == "term":
        if args.term_command == "today":
            return command_term_today(settings, args.dry_run)
        if args.term_command == "history":
            return command_term_history(settings, args.channel, args.limit)
        return command_term_pin(settings, args.date, args.term)
    return command_run(settings)


if __name__ == "__main__":
    sys.exit(main())
