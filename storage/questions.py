"""Looking up a stored question by id, and remembering the bot's reply message for it.

Used to answer an already-stored question (crash recovery, retries): everything needed to reply
in the right Slack thread is read back from the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.db import bound_engine, retry_on_disconnect
from storage.models import Conversation, Message

# A bind name unlike the column's: that one is reserved for the SET clause.
_SET_REPLY_TS = update(Message).where(Message.id == bindparam("b_message_id")).values(reply_ts=bindparam("b_reply_ts"))


@dataclass(frozen=True)
class StoredQuestion:
    id: int
    conversation_id: int
    team_id: str
    channel_id: str
    thread_ts: str
    text: str
    slack_user: str | None
    slack_ts: str | None
    status: str
    reply_ts: str | None


@dataclass(frozen=True)
class AskedQuestion:
    """One of a user's questions as the Home tab lists it."""

    channel_id: str
    thread_ts: str
    slack_ts: str
    text: str
    status: str
    created_at: datetime


class QuestionStore:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory
        self._engine = bound_engine(session_factory)

    @property
    def session_factory(self) -> sessionmaker[Session]:
        return self._session_factory

    def get(self, message_id: int) -> StoredQuestion | None:
        """The user message `message_id` with its thread; None if absent or not a question."""
        with self._session_factory() as session:
            row = session.execute(
                select(Message, Conversation)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(Message.id == message_id, Message.role == "user")
            ).first()
            if row is None:
                return None
            message, conversation = row
            return StoredQuestion(
                id=message.id,
                conversation_id=conversation.id,
                team_id=conversation.team_id,
                channel_id=conversation.channel_id,
                thread_ts=conversation.thread_ts,
                text=message.text,
                slack_user=message.slack_user,
                slack_ts=message.slack_ts,
                status=message.status,
                reply_ts=message.reply_ts,
            )

    @retry_on_disconnect
    def set_reply_ts(self, message_id: int, reply_ts: str | None) -> None:
        # A plain Core statement: this runs for every answer.
        with self._engine.begin() as connection:
            connection.execute(_SET_REPLY_TS, {"b_message_id": message_id, "b_reply_ts": reply_ts})

    def answer_of(self, question_id: int) -> int | None:
        """The id of the latest assistant message answering `question_id`."""
        with self._session_factory() as session:
            return session.scalar(
                select(Message.id)
                .where(Message.reply_to_id == question_id, Message.role == "assistant")
                .order_by(Message.id.desc())
                .limit(1)
            )

    def recent_by_user(self, team_id: str, slack_user: str, limit: int = 5) -> list[AskedQuestion]:
        """The user's latest questions in this workspace, newest first."""
        with self._session_factory() as session:
            rows = session.execute(
                select(Conversation.channel_id, Conversation.thread_ts, Message.slack_ts, Message.text,
                       Message.status, Message.created_at)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(
                    Conversation.team_id == team_id,
                    Message.slack_user == slack_user,
                    Message.role == "user",
                    Message.slack_ts.is_not(None),
                )
                .order_by(Message.id.desc())
                .limit(limit)
            ).all()
        return [AskedQuestion(*row) for row in rows]

    def counts_since(self, since: datetime) -> dict[str, int]:
        """Questions people asked since `since`, by status (received, generating, answered, failed)."""
        with self._session_factory() as session:
            rows = session.execute(
                select(Message.status, func.count())
                .where(Message.role == "user", Message.slack_user.is_not(None), Message.created_at >= since)
                .group_by(Message.status)
            ).all()
        return {status: count for status, count in rows}
