"""Channels where every top-level question is answered without a mention."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage.models import QAChannel


class QAChannelStore:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def is_qa_channel(self, team_id: str, channel_id: str) -> bool:
        with self._session_factory() as session:
            return session.get(QAChannel, (team_id, channel_id)) is not None

    def add(self, team_id: str, channel_id: str, added_by: str | None) -> bool:
        """True when added, False when it already was a Q&A channel."""
        with self._session_factory() as session:
            if session.get(QAChannel, (team_id, channel_id)) is not None:
                return False
            session.add(QAChannel(team_id=team_id, channel_id=channel_id, added_by=added_by))
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                return False
            return True

    def remove(self, team_id: str, channel_id: str) -> bool:
        with self._session_factory() as session:
            result = session.execute(
                delete(QAChannel).where(QAChannel.team_id == team_id, QAChannel.channel_id == channel_id)
            )
            session.commit()
            return bool(result.rowcount)

    def channels(self, team_id: str) -> list[str]:
        with self._session_factory() as session:
            return list(session.scalars(select(QAChannel.channel_id).where(QAChannel.team_id == team_id)))
