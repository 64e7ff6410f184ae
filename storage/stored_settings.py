"""Settings an admin changed in the Home tab, which override the environment's until reset.

A plain key → text table: each feature owns its keys and parses its values (e.g. the term of the
day's channels and time, bot/term_of_day.py). Every instance on the database reads the same rows,
so a change made through one instance reaches the others on their next read.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import StoredSetting, utcnow
from storage.upsert import insert_on_conflict


class StoredSettingStore:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def values(self, keys: Iterable[str]) -> dict[str, str]:
        """The stored values of `keys` (absent keys are left out)."""
        keys = list(keys)
        with self._session_factory() as session:
            rows = session.execute(select(StoredSetting.key, StoredSetting.value).where(StoredSetting.key.in_(keys)))
            return {key: value for key, value in rows}

    def set(self, key: str, value: str, updated_by: str | None) -> None:
        values = {"key": key, "value": value, "updated_by": updated_by, "updated_at": utcnow()}
        with self._session_factory() as session:
            session.execute(
                insert_on_conflict(
                    session, StoredSetting, values, key=("key",), update=("value", "updated_by", "updated_at")
                )
            )
            session.commit()

    def reset(self, keys: Iterable[str]) -> int:
        """Forget `keys` (the environment's values apply again); returns how many were stored."""
        with self._session_factory() as session:
            result = session.execute(delete(StoredSetting).where(StoredSetting.key.in_(list(keys))))
            session.commit()
            return result.rowcount
