"""A throwaway PostgreSQL server for tests, and the `database_url` fixture over SQLite and PostgreSQL.

Registered for every test module by `pytest_plugins` in tests/conftest.py.

The server is started once per test session with the PostgreSQL binaries found on the machine
(`initdb`, `pg_ctl`; `.ci/run` installs Debian's `postgresql` package when they are missing) in a
temporary directory, on a free local port, with trust authentication and durability switched off
(fsync, full-page writes) because the data is thrown away. Each test gets its own fresh database.
When the binaries or the psycopg driver are missing, the PostgreSQL variants are skipped with the
reason; the SQLite variants always run.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported lazily: the GPU image that runs tests/gpu has no SQLAlchemy
    from sqlalchemy.orm import Session, sessionmaker

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
BACKENDS = [SQLITE, POSTGRESQL]


def find_pg_bin_dir() -> Path | None:
    """Directory holding initdb and pg_ctl: $PG_BIN_DIR, PATH, then Debian's /usr/lib/postgresql/N/bin."""
    candidates: list[str] = []
    if os.environ.get("PG_BIN_DIR"):
        candidates.append(os.environ["PG_BIN_DIR"])
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        directory = Path(candidate)
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str = "postgres"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = "finbot_" + uuid.uuid4().hex[:12]
        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run_as(user: str | None) -> dict[str, object]:
    # PostgreSQL refuses to run as root; CI containers usually are root, so drop to an unprivileged user.
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def start_postgres(bin_dir: Path, root: Path) -> tuple[PostgresServer, Callable[[], None]]:
    """Start a server under `root`; returns it and a stop function."""
    run_user: str | None = None
    if os.geteuid() == 0:
        for candidate in ("postgres", "nobody"):
            try:
                pwd.getpwnam(candidate)
            except KeyError:
                continue
            run_user = candidate
            break
        if run_user is None:
            raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL")
        entry = pwd.getpwnam(run_user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data = root / "data"
    log = root / "postgres.log"
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
         "--locale=C.UTF-8", "--no-sync"],
        check=True, capture_output=True, env=env, cwd=root, **_run_as(run_user),  # type: ignore[arg-type]
    )
    options = (
        f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off -c full_page_writes=off "
        "-c synchronous_commit=off -c max_connections=200"
    )
    subprocess.run(
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
        check=True, capture_output=True, env=env, cwd=root, **_run_as(run_user),  # type: ignore[arg-type]
    )

    def stop() -> None:
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True, env=env, cwd=root, **_run_as(run_user),  # type: ignore[arg-type]
        )

    return PostgresServer(host="127.0.0.1", port=port), stop


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run installs Debian's postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("the psycopg driver is not installed (pip install -e '.[test]')")
    root = Path(tempfile.mkdtemp(prefix="finbot-pg-"))
    os.chmod(root, 0o755)
    try:
        server, stop = start_postgres(bin_dir, root)
    except (subprocess.CalledProcessError, RuntimeError) as error:
        output = getattr(error, "stderr", b"") or b""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL from {bin_dir}: {error} {output.decode(errors='replace')[-2000:]}")
    try:
        yield server
    finally:
        stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty (not migrated) database on each backend: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == SQLITE:
        yield f"sqlite:///{tmp_path / 'data' / 'finbot.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(url)


@pytest.fixture
def session_factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a migrated database of each backend, the engine disposed afterwards."""
    from storage.db import create_db_engine, make_session_factory, upgrade_database

    upgrade_database(database_url)
    engine = create_db_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


@dataclass
class RestartablePostgres:
    """A private PostgreSQL server (tests/postgres.py's) that a test may stop and start again."""

    server: PostgresServer
    bin_dir: Path
    root: Path
    options: str = field(default="", init=False)

    def _pg_ctl(self, *args: str) -> None:
        # As the user tests/postgres.py runs the server as (the owner of its directory) when root.
        user = self.root.owner() if os.geteuid() == 0 else None
        subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), *args],
            check=True, capture_output=True, cwd=self.root,
            env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}, timeout=60,
            **_run_as(user),  # type: ignore[arg-type]
        )

    def stop(self) -> None:
        # The server's own command line (port, socket directory, settings) for the next start.
        opts = (self.root / "data" / "postmaster.opts").read_text().strip()
        self.options = shlex.join(shlex.split(opts)[3:])  # drops the binary and its "-D DIR"
        self._pg_ctl("-m", "fast", "-w", "stop")

    def start(self) -> None:
        self._pg_ctl("-l", str(self.root / "postgres.log"), "-o", self.options, "-w", "-t", "60", "start")


@contextmanager
def restartable_postgres_server() -> Iterator[RestartablePostgres]:
    """A private server, like `postgres_server`'s, that its user may stop and start again."""
    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    root = Path(tempfile.mkdtemp(prefix="finbot-pg-restart-"))
    os.chmod(root, 0o755)
    server, stop = start_postgres(bin_dir, root)
    try:
        yield RestartablePostgres(server, bin_dir, root)
    finally:
        stop()
        shutil.rmtree(root, ignore_errors=True)
