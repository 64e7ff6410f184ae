"""Persistence for 오늘의 금융용어: the per-(channel, date) claim, its outcome, and operator pins.

Exactly-once rests on the database, not on the scheduler:

- `claim` INSERTs the `term_posts` row before any generation. The unique (channel_id, post_date)
  makes the INSERT the arbitration point: whichever instance (or thread, or retried job) commits
  first owns the day; every other one gets an IntegrityError and returns None.
- A claim left in 'claimed' by a crashed instance is *stale* once its `claimed_at` is older than the
  caller's cutoff. `claim` may then take it over with one conditional UPDATE
  (``... WHERE status = 'claimed' AND claimed_at < cutoff``), which only one contender can win.
- The owner refreshes `claimed_at` with `confirm_claim` right before it posts to Slack, and only
  posts when that UPDATE still matches its own `claimed_by`. So a slow-but-alive owner is never
  overtaken in the seconds between its check and its post (the stale cutoff is many minutes), and
  a taken-over owner never posts.

Every method runs its own short transaction, so several processes can share one database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage.models import TermPin, TermPost
from storage.upsert import insert_on_conflict


@dataclass(frozen=True)
class StoredTermPost:
    id: int
    channel_id: str
    post_date: date
    term: str
    term_key: str
    category: str | None
    status: str
    explanation: str | None
    slack_ts: str | None
    claimed_by: str | None
    error: str | None
    claimed_at: datetime
    posted_at: datetime | None


@dataclass(frozen=True)
class Claim:
    """A claim this instance holds; `taken_over` when it replaced another instance's stale claim."""

    post: StoredTermPost
    taken_over: bool = False


def _stored(row: TermPost) -> StoredTermPost:
    return StoredTermPost(
        id=row.id,
        channel_id=row.channel_id,
        post_date=row.post_date,
        term=row.term,
        term_key=row.term_key,
        category=row.category,
        status=row.status,
        explanation=row.explanation,
        slack_ts=row.slack_ts,
        claimed_by=row.claimed_by,
        error=row.error,
        claimed_at=row.claimed_at,
        posted_at=row.posted_at,
    )


class TermPostStore:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    # ------------------------------------------------------------------ claims

    def claim(
        self,
        channel_id: str,
        post_date: date,
        *,
        term: str,
        term_key: str,
        category: str | None,
        claimed_by: str,
        now: datetime,
        stale_before: datetime | None = None,
        owner_is_gone: Callable[[str], bool] | None = None,
    ) -> Claim | None:
        """Claim (channel, date) for this instance; None when someone else holds or finished it.

        With `stale_before`, a row still 'claimed' since before that instant is taken over
        atomically (its crashed owner never confirmed it; see the module docstring). So is one
        whose owner `owner_is_gone` says is dead, whatever its age: a killed process that is
        restarted picks its day up at once instead of after the stale cutoff.
        """
        with self._session_factory() as session:
            row = TermPost(
                channel_id=channel_id,
                post_date=post_date,
                term=term,
                term_key=term_key,
                category=category,
                status="claimed",
                claimed_by=claimed_by,
                claimed_at=now,
            )
            session.add(row)
            try:
                session.commit()
                return Claim(_stored(row))
            except IntegrityError:
                session.rollback()
        if stale_before is None and owner_is_gone is None:
            return None
        with self._session_factory() as session:
            abandoned = []
            if stale_before is not None:
                abandoned.append(TermPost.claimed_at < stale_before)
            if owner_is_gone is not None:
                holder = session.scalar(
                    select(TermPost.claimed_by).where(
                        TermPost.channel_id == channel_id, TermPost.post_date == post_date, TermPost.status == "claimed"
                    )
                )
                if holder is not None and holder != claimed_by and owner_is_gone(holder):
                    # Only that same dead holder: a takeover by anyone else changes claimed_by.
                    abandoned.append(TermPost.claimed_by == holder)
            if not abandoned:
                return None
            # The term is kept as the crashed owner chose it: the choice is deterministic anyway, and
            # the history must not change under a post that may already be visible in Slack.
            # RETURNING hands back the row this UPDATE won, with no second read that could race.
            taken = session.scalars(
                update(TermPost)
                .where(
                    TermPost.channel_id == channel_id,
                    TermPost.post_date == post_date,
                    TermPost.status == "claimed",
                    or_(*abandoned),
                )
                .values(claimed_by=claimed_by, claimed_at=now)
                .returning(TermPost)
            ).one_or_none()
            session.commit()
            return Claim(_stored(taken), taken_over=True) if taken is not None else None

    def confirm_claim(self, post_id: int, claimed_by: str, now: datetime) -> bool:
        """Refresh our claim right before posting; False when it is no longer ours to post."""
        return self._update_own_claim(post_id, claimed_by, claimed_at=now)

    def mark_posted(
        self,
        post_id: int,
        claimed_by: str,
        *,
        slack_ts: str,
        explanation: str,
        now: datetime,
        error: str | None = None,
    ) -> bool:
        """Record the Slack post; `error` keeps why generation fell back, if it did."""
        return self._update_own_claim(
            post_id, claimed_by, status="posted", slack_ts=slack_ts, explanation=explanation, posted_at=now, error=error
        )

    def mark_failed(self, post_id: int, claimed_by: str, error: str, explanation: str | None = None) -> bool:
        """The Slack post itself failed; the day stays claimed (status 'failed') so nothing retries blindly."""
        return self._update_own_claim(post_id, claimed_by, status="failed", error=error, explanation=explanation)

    def _update_own_claim(self, post_id: int, claimed_by: str, **values: Any) -> bool:
        """Set `values` on our claim; False when it was taken over or is no longer 'claimed'.

        The conditions sit in the UPDATE itself, so an owner that was overtaken can never write.
        """
        with self._session_factory() as session:
            result = session.execute(
                update(TermPost)
                .where(TermPost.id == post_id, TermPost.claimed_by == claimed_by, TermPost.status == "claimed")
                .values(**values)
            )
            session.commit()
            return result.rowcount == 1

    # ------------------------------------------------------------------ reads

    def get(self, channel_id: str, post_date: date) -> StoredTermPost | None:
        with self._session_factory() as session:
            row = session.scalars(
                select(TermPost).where(TermPost.channel_id == channel_id, TermPost.post_date == post_date)
            ).one_or_none()
            return _stored(row) if row is not None else None

    def posts_on(self, post_date: date) -> list[StoredTermPost]:
        with self._session_factory() as session:
            rows = session.scalars(
                select(TermPost).where(TermPost.post_date == post_date).order_by(TermPost.id)
            ).all()
            return [_stored(row) for row in rows]

    def channel_history(self, channel_id: str, before: date) -> list[str]:
        """Term keys claimed in the channel before `before`, oldest first (for choosing the next term).

        Claimed and failed days count too: their term was chosen for that day and never comes back
        before the catalog is exhausted.
        """
        with self._session_factory() as session:
            return list(
                session.scalars(
                    select(TermPost.term_key)
                    .where(TermPost.channel_id == channel_id, TermPost.post_date < before)
                    .order_by(TermPost.post_date, TermPost.id)
                ).all()
            )

    def history(self, channel_id: str | None = None, limit: int = 50) -> list[StoredTermPost]:
        """The most recent posts (all channels unless one is given), newest first."""
        statement = select(TermPost).order_by(TermPost.post_date.desc(), TermPost.channel_id).limit(limit)
        if channel_id is not None:
            statement = statement.where(TermPost.channel_id == channel_id)
        with self._session_factory() as session:
            return [_stored(row) for row in session.scalars(statement).all()]

    # ------------------------------------------------------------------ pins

    def pin(self, post_date: date, term: str) -> None:
        """Set (or replace) the operator's term for a date."""
        with self._session_factory() as session:
            # Two operators pinning the same date at once: the last one wins, as with an update.
            session.execute(
                insert_on_conflict(
                    session, TermPin, {"post_date": post_date, "term": term}, key=("post_date",), update=("term",)
                )
            )
            session.commit()

    def pinned_term(self, post_date: date) -> str | None:
        with self._session_factory() as session:
            pin = session.get(TermPin, post_date)
            return pin.term if pin is not None else None

    def pins_from(self, first_date: date, limit: int = 20) -> list[tuple[date, str]]:
        """(date, term) of the pins on `first_date` or later, soonest first."""
        with self._session_factory() as session:
            rows = session.execute(
                select(TermPin.post_date, TermPin.term)
                .where(TermPin.post_date >= first_date)
                .order_by(TermPin.post_date)
                .limit(limit)
            ).all()
        return [(row[0], row[1]) for row in rows]

    def unpin(self, post_date: date) -> bool:
        """Remove the pin of `post_date`; False when there was none."""
        with self._session_factory() as session:
            result = session.execute(delete(TermPin).where(TermPin.post_date == post_date))
            session.commit()
            return bool(result.rowcount)
