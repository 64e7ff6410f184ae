"""Conversation persistence for the bot: plain values in, plain values out.

Every method runs its own short transaction so that no session outlives a Slack event and
several bot processes can share one database safely.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from storage.models import USER_STATUSES, Conversation, Message, ProcessedEvent, utcnow


@dataclass(frozen=True)
class StoredMessage:
    id: int
    role: str
    text: str
    slack_user: str | None
    slack_ts: str | None
    status: str
    reply_to_id: int | None
    created_at: datetime


class ConversationStore:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def claim_event(self, event_id: str) -> bool:
        """Return True exactly once per event id, even across processes.

        The primary key does the arbitration: a SELECT-then-INSERT would let two processes
        both see "absent" and both answer Slack's retry.
        """
        with self._session_factory() as session:
            session.add(ProcessedEvent(event_id=event_id))
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                return False
            return True

    def find_conversation(self, team_id: str, channel_id: str, thread_ts: str) -> int | None:
        with self._session_factory() as session:
            return self._find_conversation(session, team_id, channel_id, thread_ts)

    def get_or_create_conversation(self, team_id: str, channel_id: str, thread_ts: str) -> int:
        with self._session_factory() as session:
            existing = self._find_conversation(session, team_id, channel_id, thread_ts)
            if existing is not None:
                return existing
            conversation = Conversation(team_id=team_id, channel_id=channel_id, thread_ts=thread_ts)
            session.add(conversation)
            try:
                session.commit()
            except IntegrityError:
                # Another process created the same thread between our SELECT and INSERT.
                session.rollback()
                existing = self._find_conversation(session, team_id, channel_id, thread_ts)
                if existing is None:
                    raise
                return existing
            return conversation.id

    def add_user_message(
        self, conversation_id: int, text: str, slack_user: str | None, slack_ts: str | None
    ) -> int | None:
        """Store a question as 'received'; None when this Slack message was already stored."""
        with self._session_factory() as session:
            message = Message(
                conversation_id=conversation_id,
                role="user",
                text=text,
                slack_user=slack_user,
                slack_ts=slack_ts,
                status="received",
            )
            session.add(message)
            try:
                # Flushing first makes the duplicate (or FK) error surface here rather than in _touch.
                session.flush()
                self._touch(session, conversation_id)
                session.commit()
            except IntegrityError:
                session.rollback()
                # Only a duplicate means "already stored"; e.g. a missing conversation must still raise.
                if slack_ts is not None and self._user_message_exists(session, conversation_id, slack_ts):
                    return None
                raise
            return message.id

    def set_status(self, message_id: int, status: str, error: str | None = None) -> None:
        if status not in USER_STATUSES:
            raise ValueError(f"unknown status {status!r}; expected one of {USER_STATUSES}")
        with self._session_factory() as session:
            # The error is overwritten too, so a retried question does not keep an old failure text.
            result = session.execute(
                update(Message).where(Message.id == message_id).values(status=status, error=error)
            )
            if result.rowcount == 0:
                raise LookupError(f"no message with id {message_id}")
            session.commit()

    def add_assistant_message(
        self, conversation_id: int, text: str, reply_to_id: int, slack_ts: str | None
    ) -> int:
        """Store an answer and mark its question answered, atomically.

        Done in one transaction so a crash can never leave an answer whose question still looks
        unanswered (and would be answered again) or vice versa.
        """
        with self._session_factory() as session:
            question = session.get(Message, reply_to_id)
            if question is None or question.conversation_id != conversation_id or question.role != "user":
                raise ValueError(
                    f"message {reply_to_id} is not a user message of conversation {conversation_id}"
                )
            answer = Message(
                conversation_id=conversation_id,
                role="assistant",
                text=text,
                slack_ts=slack_ts,
                status="answered",
                reply_to_id=reply_to_id,
            )
            session.add(answer)
            question.status = "answered"
            question.error = None
            self._touch(session, conversation_id)
            session.commit()
            return answer.id

    def history(self, conversation_id: int, before_message_id: int | None = None) -> list[tuple[str, str]]:
        """(question, answer) pairs that were answered, oldest first, for building the prompt."""
        question = aliased(Message)
        answer = aliased(Message)
        statement = (
            select(question.id, question.text, answer.text)
            .join(answer, answer.reply_to_id == question.id)
            .where(
                question.conversation_id == conversation_id,
                question.role == "user",
                answer.role == "assistant",
            )
            .order_by(question.id, answer.id)
        )
        if before_message_id is not None:
            statement = statement.where(question.id < before_message_id)
        with self._session_factory() as session:
            rows = session.execute(statement).all()
        # Should a question ever get two answers, the later one wins (dicts keep first-insertion order).
        pairs: dict[int, tuple[str, str]] = {}
        for question_id, question_text, answer_text in rows:
            pairs[question_id] = (question_text, answer_text)
        return list(pairs.values())

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        with self._session_factory() as session:
            rows = session.scalars(
                select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)
            ).all()
            return [
                StoredMessage(
                    id=row.id,
                    role=row.role,
                    text=row.text,
                    slack_user=row.slack_user,
                    slack_ts=row.slack_ts,
                    status=row.status,
                    reply_to_id=row.reply_to_id,
                    created_at=row.created_at,
                )
                for row in rows
            ]

    @staticmethod
    def _find_conversation(session: Session, team_id: str, channel_id: str, thread_ts: str) -> int | None:
        return session.scalar(
            select(Conversation.id).where(
                Conversation.team_id == team_id,
                Conversation.channel_id == channel_id,
                Conversation.thread_ts == thread_ts,
            )
        )

    @staticmethod
    def _user_message_exists(session: Session, conversation_id: int, slack_ts: str) -> bool:
        found = session.scalar(
            select(Message.id).where(
                Message.conversation_id == conversation_id,
                Message.role == "user",
                Message.slack_ts == slack_ts,
            )
        )
        return found is not None

    @staticmethod
    def _touch(session: Session, conversation_id: int) -> None:
        session.execute(
            update(Conversation).where(Conversation.id == conversation_id).values(updated_at=utcnow())
        )
