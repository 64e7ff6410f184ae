"""Conversation retention: a daily purge of old threads and old Slack event ids.

A conversation is expired when it has not been touched (`updated_at`, bumped by every stored
message) for `days` days; deleting it removes its messages and their feedback through the
database's ON DELETE CASCADE. Processed event ids only need to outlive Slack's retries (minutes),
so they are kept for `event_days`. Deletions run in batches so a first purge of a big database
does not hold one long transaction (other instances keep writing meanwhile).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, time, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Conversation, ProcessedEvent, utcnow

logger = logging.getLogger(__name__)

RETENTION_JOB_ID = "retention-purge"
BATCH_SIZE = 500


@dataclass(frozen=True)
class PurgeResult:
    conversations: int
    processed_events: int


def purge_expired(
    session_factory: sessionmaker[Session],
    now: datetime | None = None,
    days: int = 90,
    event_days: int = 7,
    batch_size: int = BATCH_SIZE,
) -> PurgeResult:
    """Delete conversations untouched for `days` days (0 keeps them) and event ids older than `event_days`."""
    now = now or utcnow()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    conversations = 0
    if days > 0:
        cutoff = now - timedelta(days=days)
        while True:
            with session_factory() as session:
                ids = session.scalars(
                    select(Conversation.id).where(Conversation.updated_at < cutoff).limit(batch_size)
                ).all()
                if not ids:
                    break
                session.execute(delete(Conversation).where(Conversation.id.in_(ids)))
                session.commit()
            conversations += len(ids)
    events = 0
    if event_days > 0:
        with session_factory() as session:
            result = session.execute(
                delete(ProcessedEvent).where(ProcessedEvent.received_at < now - timedelta(days=event_days))
            )
            session.commit()
            events = result.rowcount or 0
    if conversations or events:
        logger.info(
            "retention purge: deleted %d conversation(s) older than %d days and %d event id(s)",
            conversations, days, events,
        )
    return PurgeResult(conversations=conversations, processed_events=events)


def schedule_retention(
    scheduler: object,
    session_factory: sessionmaker[Session],
    days: int,
    event_days: int,
    at: time = time(4, 30),
) -> bool:
    """Add the daily purge to a `bot.scheduler.FinbotScheduler` (04:30 local by default).

    Safe with several instances: each runs the same idempotent DELETEs. Returns False, scheduling
    nothing, when retention is switched off (`days` and `event_days` both 0: nothing to purge).
    """
    if days <= 0 and event_days <= 0:
        return False

    def run() -> None:
        try:
            purge_expired(session_factory, days=days, event_days=event_days)
        except Exception:
            logger.exception("retention purge failed; it runs again tomorrow")

    scheduler.add_daily_job(RETENTION_JOB_ID, run, at=at)  # type: ignore[attr-defined]
    return True
