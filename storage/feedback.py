"""👍/👎 votes on answers: one per user per answer; a second click changes the vote."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from storage.models import Conversation, Feedback, Message, utcnow


class FeedbackStore:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def vote(self, answer_id: int, slack_user: str, vote: int) -> bool:
        """Record `vote` (+1/-1) of `slack_user` on assistant message `answer_id`.

        Returns True when a new vote was stored, False when an earlier vote was changed.
        """
        if vote not in (-1, 1):
            raise ValueError(f"vote must be -1 or 1, got {vote}")
        with self._session_factory() as session:
            answer = session.get(Message, answer_id)
            if answer is None or answer.role != "assistant":
                raise LookupError(f"message {answer_id} is not an answer")
            existing = self._find(session, answer_id, slack_user)
            if existing is not None:
                existing.vote = vote
                existing.updated_at = utcnow()
                session.commit()
                return False
            session.add(Feedback(message_id=answer_id, slack_user=slack_user, vote=vote))
            try:
                session.commit()
                return True
            except IntegrityError:
                # A concurrent first click of the same user: the row exists now, change it.
                session.rollback()
                existing = self._find(session, answer_id, slack_user)
                if existing is None:
                    raise
                existing.vote = vote
                existing.updated_at = utcnow()
                session.commit()
                return False

    def votes(self) -> list[tuple[int, str, int]]:
        """(answer id, user, vote) of every vote, oldest first."""
        with self._session_factory() as session:
            rows = session.execute(
                select(Feedback.message_id, Feedback.slack_user, Feedback.vote).order_by(Feedback.id)
            ).all()
            return [(row[0], row[1], row[2]) for row in rows]

    def export_rows(self) -> Iterator[dict[str, Any]]:
        """Every vote with its answer, question and thread, for evaluating the model."""
        answer = aliased(Message)
        question = aliased(Message)
        statement = (
            select(Feedback, answer, question, Conversation)
            .join(answer, answer.id == Feedback.message_id)
            .join(Conversation, Conversation.id == answer.conversation_id)
            .outerjoin(question, question.id == answer.reply_to_id)
            .order_by(Feedback.id)
        )
        with self._session_factory() as session:
            for feedback, answer_row, question_row, conversation in session.execute(statement):
                yield {
                    "feedback_id": feedback.id,
                    "vote": feedback.vote,
                    "user": feedback.slack_user,
                    "answer_id": answer_row.id,
                    "answer": answer_row.text,
                    "question_id": question_row.id if question_row is not None else None,
                    "question": question_row.text if question_row is not None else None,
                    "asked_by": question_row.slack_user if question_row is not None else None,
                    "team_id": conversation.team_id,
                    "channel_id": conversation.channel_id,
                    "thread_ts": conversation.thread_ts,
                    "created_at": feedback.created_at.isoformat(),
                    "updated_at": feedback.updated_at.isoformat(),
                }

    def export_jsonl(self, out: IO[str]) -> int:
        count = 0
        for row in self.export_rows():
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
        return count

    @staticmethod
    def _find(session: Session, answer_id: int, slack_user: str) -> Feedback | None:
        return session.scalar(
            select(Feedback).where(Feedback.message_id == answer_id, Feedback.slack_user == slack_user)
        )
