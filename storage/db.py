"""Engine, session and migration helpers; everything takes a plain database URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations

SQLITE_BUSY_TIMEOUT_MS = 5000


def _is_memory_sqlite(database: str | None) -> bool:
    return (
        not database
        or database == ":memory:"
        or database.startswith("file::memory:")
        or "mode=memory" in database
    )


def _ensure_sqlite_directory(url: str) -> None:
    # SQLite creates the file but not its directory; a fresh checkout would fail on first start.
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not _is_memory_sqlite(parsed.database):
        assert parsed.database is not None
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def use_wal(cursor: Any) -> None:
    """Put a SQLite file in WAL mode, which lets readers proceed while the bot writes.

    The mode is stored in the file, so it is switched only when it is not WAL yet: asking again on
    every new connection fails at once with "database is locked" (the busy timeout does not apply)
    whenever another connection is writing at that moment. The migrations switch the file first,
    on their single connection, before any bot connection exists.
    """
    if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")


def create_db_engine(url: str) -> Engine:
    """Create an engine; SQLite connections get the pragmas that make multi-process use safe."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pre_ping so a long-lived bot survives the server dropping idle connections.
        return create_engine(url, pool_pre_ping=True)

    in_memory = _is_memory_sqlite(parsed.database)
    _ensure_sqlite_directory(url)

    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _set_sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            # Wait for another process's write lock instead of failing at once with "database is locked".
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            # SQLite ignores foreign keys (and so ON DELETE CASCADE) unless asked per connection.
            cursor.execute("PRAGMA foreign_keys=ON")
            # Meaningless (and refused) for :memory:.
            if not in_memory:
                use_wal(cursor)
        finally:
            cursor.close()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # Callers read attributes after the short transactions commit; expiring would force reloads.
    return sessionmaker(bind=engine, expire_on_commit=False)


def bound_engine(session_factory: sessionmaker[Session]) -> Engine:
    """The engine of a factory from `make_session_factory`, for stores that run Core statements on
    a plain connection (cheaper than a session on the per-message hot path)."""
    bind = session_factory.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError(f"the session factory is not bound to an engine (bind={bind!r}); use make_session_factory")
    return bind


def open_database(url: str) -> sessionmaker[Session]:
    """The session factory a process uses for all of its stores: one engine, one connection pool."""
    return make_session_factory(create_db_engine(url))


# Any fixed 64-bit number, the same in every finbot process ("finbot" in ASCII).
MIGRATION_LOCK_ID = 0x66696E626F74


def migrations_directory() -> Path:
    # Found from the package, not the working directory, so installed copies and tests both work.
    return Path(migrations.__file__).parent


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_directory()))
    # ConfigParser treats '%' as interpolation; URL-encoded passwords contain it.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    # Migrations open their own engine (see migrations/env.py), so the directory is made here too.
    _ensure_sqlite_directory(url)
    if make_url(url).get_backend_name() != "postgresql":
        command.upgrade(alembic_config(url), revision)
        return
    # Several bot processes sharing one PostgreSQL database may start at the same moment: a
    # session-level advisory lock lets one migrate while the others wait, then find nothing to do.
    engine = create_db_engine(url)
    try:
        with engine.connect() as lock_connection:
            lock_connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            try:
                command.upgrade(alembic_config(url), revision)
            finally:
                lock_connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
    finally:
        engine.dispose()


def downgrade_database(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
