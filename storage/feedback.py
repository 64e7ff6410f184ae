"""👍/👎 votes on answers: one per user per answer; a second click changes the vote."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from storage.models import Conversation, Feedback, Message, utcnow
from storage.upsert import insert_on_conflict


@dataclass(frozen=True)
class RatedAnswer:
    """An answer with its votes, for the admins' review list."""

    answer_id: int
    question: str
    channel_id: str
    thread_ts: str
    question_ts: str | None
    ups: int
    downs: int


class FeedbackStore:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def vote(self, answer_id: int, slack_user: str, vote: int) -> bool:
        """Record `vote` (+1/-1) of `slack_user` on assistant message `answer_id`.

        The caller passes an answer id (`QuestionStore.answer_of` only returns assistant messages).
        Returns True when a new vote was stored, False when an earlier vote was changed.
        """
        if vote not in (-1, 1):
            raise ValueError(f"vote must be -1 or 1, got {vote}")
        now = utcnow()
        with self._session_factory() as session:
            # One statement, so a double click racing with itself changes the vote instead of failing.
            statement = insert_on_conflict(
                session,
                Feedback,
                {"message_id": answer_id, "slack_user": slack_user, "vote": vote, "created_at": now, "updated_at": now},
                key=("message_id", "slack_user"),
                update=("vote", "updated_at"),
            )
            created_at = session.scalar(statement.returning(Feedback.created_at))
            session.commit()
        # A changed vote keeps its first click's created_at; only a new row carries ours.
        return created_at == now

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

    def counts_since(self, since: datetime) -> tuple[int, int]:
        """(👍, 👎) votes cast or changed since `since`."""
        with self._session_factory() as session:
            rows = session.execute(
                select(Feedback.vote, func.count()).where(Feedback.updated_at >= since).group_by(Feedback.vote)
            ).all()
        counts = dict(rows)
        return counts.get(1, 0), counts.get(-1, 0)

    def worst_rated(self, since: datetime, limit: int = 5) -> list[RatedAnswer]:
        """Answers with a 👎 voted since `since`, most disliked first (net score, then 👎 count)."""
        ups = func.sum(case((Feedback.vote > 0, 1), else_=0))
        downs = func.sum(case((Feedback.vote < 0, 1), else_=0))
        votes = (
            select(Feedback.message_id, ups.label("ups"), downs.label("downs"))
            .where(Feedback.updated_at >= since)
            .group_by(Feedback.message_id)
            .having(downs > 0)
            .subquery()
        )
        answer = aliased(Message)
        question = aliased(Message)
        statement = (
            select(answer.id, question.text, Conversation.channel_id, Conversation.thread_ts, question.slack_ts,
                   votes.c.ups, votes.c.downs)
            .join(votes, votes.c.message_id == answer.id)
            .join(Conversation, Conversation.id == answer.conversation_id)
            .join(question, question.id == answer.reply_to_id)
            .order_by((votes.c.ups - votes.c.downs).asc(), votes.c.downs.desc(), answer.id.desc())
            .limit(limit)
        )
        with self._session_factory() as session:
            return [RatedAnswer(*row) for row in session.execute(statement).all()]
