"""How long answered questions took (time to first text, to the final answer), for the admins' Home tab.

Prometheus has the same figures per process (bot/metrics.py); these rows are the database's copy,
so the Home tab shows one median for all instances and across restarts. Rows go with their
question when retention deletes its conversation (ON DELETE CASCADE).
"""

from __future__ import annotations

import statistics
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import AnswerTiming
from storage.upsert import insert_on_conflict


class AnswerTimingStore:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def record(self, question_id: int, *, first_text_ms: int, answer_ms: int, tokens: int) -> None:
        values = {"question_id": question_id, "first_text_ms": first_text_ms, "answer_ms": answer_ms, "tokens": tokens}
        with self._session_factory() as session:
            # A question answered again (after a takeover) keeps its latest timing.
            session.execute(
                insert_on_conflict(
                    session, AnswerTiming, values, key=("question_id",), update=("first_text_ms", "answer_ms", "tokens")
                )
            )
            session.commit()

    def median_first_text_ms(self, since: datetime) -> float | None:
        """The median time to first text of questions answered since `since`; None without any."""
        with self._session_factory() as session:
            values = session.scalars(select(AnswerTiming.first_text_ms).where(AnswerTiming.created_at >= since)).all()
        return statistics.median(values) if values else None
