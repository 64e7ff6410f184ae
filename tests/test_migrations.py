"""The Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from storage.db import create_db_engine, current_revision, downgrade_database, upgrade_database
from storage.models import Base

TABLES = {
    "conversations",
    "messages",
    "processed_events",
    "feedback",
    "term_lookups",
    "qa_channels",
    "term_posts",
    "term_pins",
    "answer_timings",
    "stored_settings",
}


def _head(db_url: str) -> str | None:
    from alembic.script import ScriptDirectory

    from storage.db import alembic_config

    return ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()


@pytest.fixture
def db_url(database_url: str) -> str:
    # Both backends; the SQLite file sits in a missing directory, which also checks that
    # create_db_engine/upgrade create missing parents.
    return database_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'finbot.db'}"


def _tables(url: str) -> set[str]:
    engine = create_db_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_empty_database_creates_tables(db_url: str) -> None:
    assert current_revision(db_url) is None
    upgrade_database(db_url)
    assert _tables(db_url) == TABLES
    assert current_revision(db_url) == _head(db_url)


def test_models_and_migrations_agree(db_url: str) -> None:
    upgrade_database(db_url)
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diffs = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diffs == []


def test_migrated_schema_has_cascade_and_unique_constraints(db_url: str) -> None:
    upgrade_database(db_url)
    engine = create_db_engine(db_url)
    try:
        inspector = inspect(engine)
        foreign_keys = {fk["constrained_columns"][0]: fk for fk in inspector.get_foreign_keys("messages")}
        uniques = {tuple(uq["column_names"]) for uq in inspector.get_unique_constraints("messages")}
    finally:
        engine.dispose()
    assert foreign_keys["conversation_id"]["options"].get("ondelete") == "CASCADE"
    assert foreign_keys["conversation_id"]["referred_table"] == "conversations"
    assert foreign_keys["reply_to_id"]["referred_table"] == "messages"
    assert ("conversation_id", "role", "slack_ts") in uniques


def test_check_constraints_match_the_migrations_text(sqlite_url: str) -> None:
    """Autogenerate does not compare CHECK texts; SQLite keeps them verbatim, so compare them there."""
    from sqlalchemy import CheckConstraint

    upgrade_database(sqlite_url)
    engine = create_db_engine(sqlite_url)
    try:
        inspector = inspect(engine)
        migrated = {
            (table, check["name"]): check["sqltext"] for table in TABLES for check in inspector.get_check_constraints(table)
        }
    finally:
        engine.dispose()
    modelled = {
        (table.name, constraint.name): str(constraint.sqltext)
        for table in Base.metadata.tables.values()
        for constraint in table.constraints
        if isinstance(constraint, CheckConstraint)
    }
    assert modelled == migrated
    assert len(modelled) == 4


def test_downgrade_to_base_and_upgrade_again(db_url: str) -> None:
    upgrade_database(db_url)
    downgrade_database(db_url, "base")
    assert _tables(db_url) == set()
    assert current_revision(db_url) is None
    upgrade_database(db_url)
    assert _tables(db_url) == TABLES
    assert current_revision(db_url) == _head(db_url)


def test_sqlite_connections_use_wal_and_foreign_keys(sqlite_url: str) -> None:
    db_url = sqlite_url
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 5000
    finally:
        engine.dispose()
    assert Path(db_url.removeprefix("sqlite:///")).parent.is_dir()


def test_a_new_connection_opens_while_another_process_writes(sqlite_url: str) -> None:
    """A bot under load opens pooled connections while others write: opening one must not fail
    with "database is locked" (it did, now and then, when every connect asked for WAL again)."""
    upgrade_database(sqlite_url)
    path = sqlite_url.removeprefix("sqlite:///")
    # The migrated file is already WAL, so no connection needs to switch it later.
    probe = sqlite3.connect(path)
    try:
        assert probe.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        probe.close()
    writer = sqlite3.connect(path, isolation_level=None)
    engine = create_db_engine(sqlite_url)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO qa_channels (team_id, channel_id, added_by, added_at) VALUES ('T1', 'C1', 'U1', '2026-01-01')")
        with engine.connect() as connection:
            # WAL readers see the last committed state while the write is in progress.
            assert connection.execute(text("SELECT count(*) FROM qa_channels")).scalar() == 0
        writer.execute("COMMIT")
    finally:
        writer.close()
        engine.dispose()


def test_in_memory_sqlite_skips_wal_but_keeps_foreign_keys() -> None:
    engine = create_db_engine("sqlite://")
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "memory"
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()


def test_instances_starting_together_on_postgresql_migrate_once(db_url: str) -> None:
    import threading

    from tests.postgres import is_postgres

    if not is_postgres(db_url):
        pytest.skip("several instances share a database only on PostgreSQL")
    errors: list[BaseException] = []

    def start_instance() -> None:
        try:
            upgrade_database(db_url)
        except BaseException as error:  # reported below, with the thread's exception
            errors.append(error)

    # Without the advisory lock both would create the same tables and one would fail.
    threads = [threading.Thread(target=start_instance) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert current_revision(db_url) == _head(db_url)
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("select count(*) from alembic_version")).scalar() == 1
    finally:
        engine.dispose()
