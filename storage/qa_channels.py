"""Channels where every top-level question is answered without a mention."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import QAChannel
from storage.upsert import insert_on_conflict


class QAChannelStore:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def is_qa_channel(self, team_id: str, channel_id: str) -> bool:
        with self._session_factory() as session:
            return session.get(QAChannel, (team_id, channel_id)) is not None

    def channels(self, team_id: str) -> list[str]:
        """The workspace's Q&A channels turned on in Slack, oldest first."""
        with self._session_factory() as session:
            return list(session.scalars(
                select(QAChannel.channel_id).where(QAChannel.team_id == team_id).order_by(QAChannel.added_at)
            ).all())

    def add(self, team_id: str, channel_id: str, added_by: str | None) -> bool:
        """True when added, False when it already was a Q&A channel."""
        with self._session_factory() as session:
            # DO NOTHING rather than SELECT-then-INSERT: two simultaneous "켜기" must not fail.
            added = session.scalar(
                insert_on_conflict(
                    session,
                    QAChannel,
                    {"team_id": team_id, "channel_id": channel_id, "added_by": added_by},
                    key=("team_id", "channel_id"),
                ).returning(QAChannel.channel_id)
            )
            session.commit()
            return added is not None

    def remove(self, team_id: str, channel_id: str) -> bool:
        with self._session_factory() as session:
            result = session.execute(
                delete(QAChannel).where(QAChannel.team_id == team_id, QAChannel.channel_id == channel_id)
            )
            session.commit()
            return bool(result.rowcount)
