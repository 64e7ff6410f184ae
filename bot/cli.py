"""The `finbot` command: run the bot, ask a question from the terminal, migrate the database."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

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
    )


def command_db_upgrade(settings: FinbotSettings, revision: str) -> int:
    from storage.db import current_revision, upgrade_database

    upgrade_database(settings.database_url, revision)
    logger.info("database at revision %s", current_revision(settings.database_url))
    return 0


def command_ask(settings: FinbotSettings, question: str) -> int:
    from llm.answering import answer_question
    from llm.errors import PromptTooLongError

    engine = build_engine_from(settings)
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
    from storage.db import upgrade_database

    upgrade_database(settings.database_url)
    engine = build_engine_from(settings)
    finbot = build_app(settings, engine)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    if settings.slack_mode == "socket":
        from slack_bolt.adapter.socket_mode import SocketModeHandler

        if settings.slack_app_token is None:
            logger.error("SLACK_APP_TOKEN is required in Socket Mode (see .env.example)")
            return 2
        handler = SocketModeHandler(
            finbot.app, settings.slack_app_token.get_secret_value(), web_client=finbot.app.client
        )
        handler.connect()
        logger.info("finbot is ready (Socket Mode, engine %s)", engine.name)
        stop.wait()
        handler.close()
    else:
        logger.info("finbot is ready (HTTP mode on %s:%d, engine %s)", settings.http_host, settings.http_port, engine.name)
        server = threading.Thread(
            target=finbot.app.start,
            kwargs={"port": settings.http_port, "path": "/slack/events", "http_server_logger_enabled": False},
            daemon=True,
            name="finbot-http",
        )
        server.start()
        stop.wait()
    finbot.answers.shutdown(wait=True)
    engine.close()
    logger.info("finbot stopped")
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = FinbotSettings()
    configure_logging(settings.log_level)
    if args.command == "db":
        return command_db_upgrade(settings, args.revision)
    if args.command == "ask":
        return command_ask(settings, args.question)
    return command_run(settings)


if __name__ == "__main__":
    sys.exit(main())
