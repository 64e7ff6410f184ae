"""Alembic environment; configured programmatically by `storage.db.alembic_config`."""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from storage.db import SQLITE_BUSY_TIMEOUT_MS, use_wal
from storage.models import Base, UTCDateTime

config = context.config

# Only an ini-driven run (the alembic CLI) owns logging; the bot and tests configure it themselves.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("sqlalchemy.url is not set; build the config with storage.db.alembic_config(url)")
    return url


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # Revisions must not import application code that may later change; UTCDateTime only adds
    # Python-side conversion, so in the schema it is a plain timezone-aware DateTime.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _context_options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
        "render_item": _render_item,
    }


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_context_options(make_url(url).get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=NullPool)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # Batch mode drops and recreates tables; with foreign keys on, dropping a parent table
            # would cascade-delete its children's rows, so migrations run with them off.
            cursor.execute("PRAGMA foreign_keys=OFF")
            # The bot may be running against the same file; wait for its locks rather than fail.
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            use_wal(cursor)
            cursor.close()

    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **_context_options(connection.dialect.name))
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
