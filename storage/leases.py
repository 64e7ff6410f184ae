"""Ownership of unfinished questions: who answers each one, and until when that claim holds.

A question is stored with its owner (the instance that took the Slack event) and a lease. The
owner renews the leases of all its unfinished questions every few seconds, in one UPDATE. When a
lease has run out (or its owner is known to be dead) any instance may take the question over with
one conditional UPDATE, which only one contender can win: that is what makes "answered exactly
once" hold across restarts, kills and several instances on one database.

Questions stored before leases existed have no owner; they count as abandoned once older than the
caller's `legacy_before`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.db import bound_engine, retry_on_disconnect
from storage.models import Conversation, Message, utcnow

UNFINISHED: tuple[str, ...] = ("received", "generating")


@dataclass(frozen=True)
class UnfinishedQuestion:
    """A question that may have lost its owner, as read before taking it over."""

    id: int
    status: str
    owner: str | None
    lease_expires_at: datetime | None
    attempts: int
    created_at: datetime
    reply_ts: str | None
    team_id: str
    channel_id: str
    thread_ts: str

    @property
    def thread_ref(self) -> str:
        return f"{self.team_id}/{self.channel_id}/{self.thread_ts}"


class QuestionLeases:
    """The leases one instance (`owner`) holds, renews, gives up and takes over."""

    def __init__(self, session_factory: sessionmaker[Session], owner: str, lease: timedelta) -> None:
        self._session_factory = session_factory
        self._engine = bound_engine(session_factory)
        self.owner = owner
        self.lease = lease

    def lease_until(self, now: datetime | None = None) -> datetime:
        return (now or utcnow()) + self.lease

    @retry_on_disconnect
    def renew(self, now: datetime | None = None) -> int:
        """Extend every unfinished question this instance owns; returns how many."""
        with self._engine.begin() as connection:
            return connection.execute(
                update(Message)
                .where(Message.owner == self.owner, Message.role == "user", Message.status.in_(UNFINISHED))
                .values(lease_expires_at=self.lease_until(now))
            ).rowcount

    @retry_on_disconnect
    def release(self, message_ids: Collection[int] | None = None, now: datetime | None = None) -> int:
        """Give up our unfinished questions (all, or `message_ids`): any instance may take them at once."""
        conditions = [Message.owner == self.owner, Message.role == "user", Message.status.in_(UNFINISHED)]
        if message_ids is not None:
            if not message_ids:
                return 0
            conditions.append(Message.id.in_(list(message_ids)))
        with self._engine.begin() as connection:
            return connection.execute(
                update(Message).where(*conditions).values(lease_expires_at=now or utcnow())
            ).rowcount

    def abandoned(
        self,
        *,
        now: datetime | None = None,
        legacy_before: datetime,
        owner_is_gone: Callable[[str], bool] = lambda owner: False,
    ) -> list[UnfinishedQuestion]:
        """Unfinished questions whose lease ran out, whose owner is gone, or that never had an owner."""
        now = now or utcnow()
        with self._session_factory() as session:
            rows = session.execute(
                select(Message, Conversation)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(
                    Message.role == "user",
                    Message.status.in_(UNFINISHED),
                    or_(
                        Message.lease_expires_at <= now,
                        and_(Message.lease_expires_at.is_(None), Message.created_at <= legacy_before),
                        # Read so that `owner_is_gone` can judge them; few questions are ever in flight.
                        and_(Message.owner.is_not(None), Message.owner != self.owner),
                    ),
                )
                .order_by(Message.id)
            ).all()
            found = [
                UnfinishedQuestion(
                    m.id, m.status, m.owner, m.lease_expires_at, m.attempts, m.created_at, m.reply_ts,
                    c.team_id, c.channel_id, c.thread_ts,
                )
                for m, c in rows
            ]
        return [
            q for q in found
            if (q.lease_expires_at is not None and q.lease_expires_at <= now)
            or (q.lease_expires_at is None and q.created_at <= legacy_before)
            or (q.owner is not None and q.owner != self.owner and owner_is_gone(q.owner))
        ]

    def take_over(self, question: UnfinishedQuestion, *, owner_gone: bool, now: datetime | None = None) -> bool:
        """Make `question` ours, unless its owner renewed it or someone else took it first.

        The conditions re-check, inside the UPDATE, what made it abandoned: an owner that renewed
        its lease, or another instance that took it over (new owner, fresh lease), makes it fail.
        """
        now = now or utcnow()
        same_owner = Message.owner.is_(None) if question.owner is None else Message.owner == question.owner
        conditions = [Message.id == question.id, Message.status.in_(UNFINISHED), same_owner]
        if not owner_gone:
            conditions.append(or_(Message.lease_expires_at.is_(None), Message.lease_expires_at <= now))
        with self._engine.begin() as connection:
            taken = connection.execute(
                update(Message)
                .where(*conditions)
                .values(
                    owner=self.owner,
                    lease_expires_at=self.lease_until(now),
                    status="received",
                    attempts=Message.attempts + 1,
                )
            ).rowcount
        return taken == 1
