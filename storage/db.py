"""Engine, session and migration helpers; everything takes a plain database URL."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

import migrations

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

SQLITE_BUSY_TIMEOUT_MS = 5000
# A database server restarting (or failing over) refuses connections for a few seconds. Opening a
# connection (a new one, or the one replacing a connection that `pool_pre_ping` found dead) is
# retried with backoff (0.5, 1, 2, 4, then 5 s) for about this long before the caller sees the error,
# so a store call made during a restart waits for the server instead of failing.
CONNECT_RETRY_BUDGET_S = 30.0
CONNECT_RETRY_MAX_DELAY_S = 5.0
# What a server that is down, starting or stopping answers (libpq's messages, lowercased). Anything
# else (a wrong password, a missing database) fails at once: waiting would not help.
_TRANSIENT_CONNECT_ERRORS = (
    "connection refused",
    "could not connect",
    "no such file or directory",  # the Unix socket is gone while the server is down
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "server closed the connection unexpectedly",
    "terminating connection",
    "connection reset",
    "connection timed out",
    "timeout expired",
    "no route to host",
    "network is unreachable",
)


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


def is_transient_connect_error(error: BaseException) -> bool:
    """Whether a failed connection attempt may succeed a few seconds later (the server restarting)."""
    message = str(error).lower()
    return any(text in message for text in _TRANSIENT_CONNECT_ERRORS)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def retry_connects(
    engine: Engine, budget_s: float = CONNECT_RETRY_BUDGET_S, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Make `engine` retry opening connections while the server is unreachable, for `budget_s`.

    One WARNING line per retry. Together with ``pool_pre_ping`` (a pooled connection is tested
    before use and replaced when the server dropped it) a store call made while the server restarts
    waits for it and then runs on a fresh connection.
    """

    @event.listens_for(engine, "do_connect")
    def _connect_with_retries(dialect: Any, connection_record: Any, cargs: Any, cparams: Any) -> Any:
        started = time.monotonic()
        failures = 0
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as error:
                if not is_transient_connect_error(error):
                    raise
                failures += 1
                delay = min(0.5 * 2 ** (failures - 1), CONNECT_RETRY_MAX_DELAY_S)
                if time.monotonic() - started + delay > budget_s:
                    raise
                logger.warning(
                    "database unreachable (%s); retrying the connection in %.1f s (retry %d)",
                    _first_line(error), delay, failures,
                )
                sleep(delay)


def is_disconnect(error: BaseException) -> bool:
    """A statement failed because the connection to the server was lost (SQLAlchemy invalidated it)."""
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


def retry_on_disconnect(function: Callable[P, R]) -> Callable[P, R]:
    """Run a store method once more when its connection was lost in the middle of it.

    The transaction was rolled back by the server, unless the connection broke during COMMIT:
    then nobody knows whether it committed, so only decorate methods whose second run is harmless
    after a first one that did commit (an UPDATE to a fixed state, an insert guarded by a unique
    key that the method treats as "already done"). The second run opens a new connection, which
    waits for a restarting server (see `retry_connects`).
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except DBAPIError as error:
            if not is_disconnect(error):
                raise
            logger.warning(
                "database connection lost during %s (%s); trying once more",
                function.__qualname__, _first_line(error.orig or error),
            )
            return function(*args, **kwargs)

    return wrapper


def create_db_engine(url: str) -> Engine:
    """Create an engine; SQLite connections get the pragmas that make multi-process use safe.

    A server database (PostgreSQL) gets ``pool_pre_ping`` (a connection the server dropped, e.g.
    by restarting, is replaced before use instead of failing the statement) and connection retries
    while the server is unreachable (`retry_connects`).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(url, pool_pre_ping=True)
        retry_connects(engine)
        return engine

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
