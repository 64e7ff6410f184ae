"""Is the database reachable? The check behind /readyz (see bot/health.py).

It uses its own engine without a pool and without the connection retries of the stores'
engine (storage.db.retry_connects): those wait up to 30 s for a restarting server, which is
right for storing a question but would make a readiness probe hang instead of answering
"not ready". Each check opens one fresh connection and reads the migration table, so a server
that is down, a database that was dropped or a SQLite file that is gone all fail it.
"""

from __future__ import annotations

import threading

from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.pool import NullPool

# A server that does not answer within this long counts as unreachable.
CONNECT_TIMEOUT_S = 3


class DatabaseProbe:
    def __init__(self, url: str) -> None:
        self._url = url
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def _get_engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                url = make_url(self._url)
                connect_args = {} if url.get_backend_name() == "sqlite" else {"connect_timeout": CONNECT_TIMEOUT_S}
                self._engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
            return self._engine

    def check(self) -> None:
        """Returns when the database answers; raises the driver's error otherwise."""
        with self._get_engine().connect() as connection:
            connection.execute(text("SELECT version_num FROM alembic_version")).all()

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
