"""Stored answers of term lookups, so the same term costs GPU time once per lifetime."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from storage.models import TermLookup, utcnow
from storage.upsert import insert_on_conflict


@dataclass(frozen=True)
class StoredLookup:
    term_key: str
    term: str
    answer: str
    created_at: datetime


class TermLookupStore:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def get(self, term_key: str, max_age: timedelta | None = None) -> StoredLookup | None:
        """The stored answer for `term_key`, unless older than `max_age` (None: never expires)."""
        with self._session_factory() as session:
            row = session.get(TermLookup, term_key)
            if row is None:
                return None
            if max_age is not None and utcnow() - row.created_at > max_age:
                return None
            return StoredLookup(row.term_key, row.term, row.answer, row.created_at)

    def put(self, term_key: str, term: str, answer: str) -> None:
        """Store (or replace) the answer for `term_key`; its lifetime starts now."""
        with self._session_factory() as session:
            # Two lookups of the same new term may finish together; the later answer simply wins.
            session.execute(
                insert_on_conflict(
                    session,
                    TermLookup,
                    {"term_key": term_key, "term": term, "answer": answer, "created_at": utcnow()},
                    key=("term_key",),
                    update=("term", "answer", "created_at"),
                )
            )
            session.commit()
