"""Conversation persistence for the bot: plain values in, plain values out.

Every method runs its own short transaction so that no session outlives a Slack event and
several bot processes can share one database safely.

The per-question hot path (`store_question`, `start_answer`, `add_assistant_message`,
`set_status`) runs prebuilt Core statements on a plain connection: building ORM statements and
aliases and running the unit of work for every message cost more CPU than the queries themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from storage.db import bound_engine, retry_on_disconnect
from storage.models import USER_STATUSES, Conversation, Message, ProcessedEvent, utcnow

_QUESTION = aliased(Message, name="question")
_ANSWER = aliased(Message, name="answer")
_HISTORY = (
    select(_QUESTION.id, _QUESTION.text, _ANSWER.text)
    .join(_ANSWER, _ANSWER.reply_to_id == _QUESTION.id)
    .where(
        _QUESTION.conversation_id == bindparam("conversation_id"),
        _QUESTION.role == "user",
        _ANSWER.role == "assistant",
    )
    .order_by(_QUESTION.id, _ANSWER.id)
)
_HISTORY_BEFORE = _HISTORY.where(_QUESTION.id < bindparam("before_id"))
_FIND_CONVERSATION = select(Conversation.id).where(
    Conversation.team_id == bindparam("team_id"),
    Conversation.channel_id == bindparam("channel_id"),
    Conversation.thread_ts == bindparam("thread_ts"),
)
_USER_MESSAGE_ID = select(Message.id).where(
    Message.conversation_id == bindparam("conversation_id"),
    Message.role == "user",
    Message.slack_ts == bindparam("slack_ts"),
)
_EVENT_CLAIMED = select(ProcessedEvent.event_id).where(ProcessedEvent.event_id == bindparam("event_id"))
_INSERT_EVENT = insert(ProcessedEvent)
_INSERT_CONVERSATION = insert(Conversation)
_INSERT_MESSAGE = insert(Message)
# Bind names differ from the column names: those are reserved for the SET clause.
_TOUCH = update(Conversation).where(Conversation.id == bindparam("b_conversation_id")).values(
    updated_at=bindparam("b_now")
)
_SET_STATUS = update(Message).where(Message.id == bindparam("b_message_id")).values(
    status=bindparam("b_status"), error=bindparam("b_error")
)
# Marks a question answered only if it is a user message of the given conversation.
_MARK_ANSWERED = (
    update(Message)
    .where(
        and_(
            Message.id == bindparam("b_message_id"),
            Message.conversation_id == bindparam("b_conversation_id"),
            Message.role == "user",
        )
    )
    .values(status="answered", error=None, lease_expires_at=None)
)
# The same, only while the question is still unfinished and ours (see storage.leases).
_MARK_ANSWERED_OWNED = _MARK_ANSWERED.where(
    Message.owner == bindparam("b_owner"), Message.status.in_(("received", "generating"))
)
# A released lease (expired) is no longer ours to start: another instance may be taking it over.
_START_OWNED = (
    update(Message)
    .where(
        Message.id == bindparam("b_message_id"),
        Message.owner == bindparam("b_owner"),
        Message.status.in_(("received", "generating")),
        Message.lease_expires_at > bindparam("b_now"),
    )
    .values(status="generating", error=None)
)


_QUESTION_ROW = aliased(Message, name="asked")
# The answer an instance stored for its own question (the question answered and still owned by it).
_OWN_ANSWER = (
    select(Message.id)
    .join(_QUESTION_ROW, _QUESTION_ROW.id == Message.reply_to_id)
    .where(
        Message.reply_to_id == bindparam("b_question_id"),
        Message.role == "assistant",
        _QUESTION_ROW.status == "answered",
        _QUESTION_ROW.owner == bindparam("b_owner"),
    )
    .order_by(Message.id.desc())
    .limit(1)
)


class LeaseLostError(Exception):
    """The question was taken over by another instance (our lease ran out); it is theirs to answer."""


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
        self._engine = bound_engine(session_factory)

    @property
    def session_factory(self) -> sessionmaker[Session]:
        """For the other stores of the same process, so they share one engine and pool."""
        return self._session_factory

    def claim_event(self, event_id: str) -> bool:
        """Return True exactly once per event id, even across processes.

        The primary key does the arbitration: a SELECT-then-INSERT would let two processes
        both see "absent" and both answer Slack's retry.
        """
        try:
            with self._engine.begin() as connection:
                connection.execute(_INSERT_EVENT, {"event_id": event_id})
        except IntegrityError:
            return False
        return True

    def store_question(
        self,
        team_id: str,
        channel_id: str,
        thread_ts: str,
        text: str,
        slack_user: str | None,
        slack_ts: str | None,
        event_id: str | None = None,
        *,
        owner: str | None = None,
        lease_until: datetime | None = None,
    ) -> tuple[int, int] | None:
        """Claim `event_id`, find or create the thread's conversation and store the question as
        'received', all in one transaction; returns (conversation id, message id). `owner` and
        `lease_until` make it that instance's to answer (see storage.leases).

        None when the event was already claimed or this Slack message is already stored. Nothing
        is half done: a failure leaves neither the claim nor the question behind, so Slack's retry
        of the event is answered.
        """
        for attempt in (1, 2):
            try:
                with self._engine.begin() as connection:
                    # The claim goes first: the write lock is taken before anything is read.
                    if event_id is not None:
                        connection.execute(_INSERT_EVENT, {"event_id": event_id})
                    now = utcnow()
                    conversation_id = connection.scalar(
                        _FIND_CONVERSATION, {"team_id": team_id, "channel_id": channel_id, "thread_ts": thread_ts}
                    )
                    if conversation_id is None:
                        conversation_id = connection.execute(
                            _INSERT_CONVERSATION,
                            {"team_id": team_id, "channel_id": channel_id, "thread_ts": thread_ts,
                             "created_at": now, "updated_at": now},
                        ).inserted_primary_key[0]
                    else:
                        connection.execute(_TOUCH, {"b_conversation_id": conversation_id, "b_now": now})
                    message_id = connection.execute(
                        _INSERT_MESSAGE,
                        {"conversation_id": conversation_id, "role": "user", "text": text, "slack_user": slack_user,
                         "slack_ts": slack_ts, "status": "received", "created_at": now,
                         "owner": owner, "lease_expires_at": lease_until, "attempts": 0},
                    ).inserted_primary_key[0]
                    return int(conversation_id), int(message_id)
            except IntegrityError:
                # Why? An event already claimed or a message already stored means "not again";
                # else another process created the same thread between our SELECT and INSERT.
                with self._engine.begin() as connection:
                    if event_id is not None and connection.scalar(_EVENT_CLAIMED, {"event_id": event_id}):
                        return None
                    existing = connection.scalar(
                        _FIND_CONVERSATION, {"team_id": team_id, "channel_id": channel_id, "thread_ts": thread_ts}
                    )
                    if slack_ts is not None and existing is not None and connection.scalar(
                        _USER_MESSAGE_ID, {"conversation_id": existing, "slack_ts": slack_ts}
                    ) is not None:
                        return None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def find_conversation(self, team_id: str, channel_id: str, thread_ts: str) -> int | None:
        with self._engine.begin() as connection:
            return connection.scalar(
                _FIND_CONVERSATION, {"team_id": team_id, "channel_id": channel_id, "thread_ts": thread_ts}
            )

    @retry_on_disconnect
    def set_status(self, message_id: int, status: str, error: str | None = None) -> None:
        if status not in USER_STATUSES:
            raise ValueError(f"unknown status {status!r}; expected one of {USER_STATUSES}")
        with self._engine.begin() as connection:
            self._set_status(connection, message_id, status, error)

    @retry_on_disconnect
    def start_answer(
        self, message_id: int, conversation_id: int, owner: str | None = None
    ) -> list[tuple[str, str]]:
        """Mark question `message_id` 'generating' and return its thread's earlier (question, answer)
        pairs (see `history`), in one transaction.

        With `owner`, only while the question is unfinished and still that instance's: else
        `LeaseLostError` (another instance took it over, or it was finished meanwhile).
        """
        with self._engine.begin() as connection:
            if owner is None:
                self._set_status(connection, message_id, "generating", None)
            elif connection.execute(
                _START_OWNED, {"b_message_id": message_id, "b_owner": owner, "b_now": utcnow()}
            ).rowcount == 0:
                raise LeaseLostError(f"question {message_id} is no longer {owner}'s to answer")
            rows = connection.execute(
                _HISTORY_BEFORE, {"conversation_id": conversation_id, "before_id": message_id}
            ).all()
        return self._pairs(rows)

    @staticmethod
    def _set_status(connection: Connection, message_id: int, status: str, error: str | None) -> None:
        # The error is overwritten too, so a retried question does not keep an old failure text.
        result = connection.execute(_SET_STATUS, {"b_message_id": message_id, "b_status": status, "b_error": error})
        if result.rowcount == 0:
            raise LookupError(f"no message with id {message_id}")

    @retry_on_disconnect
    def add_assistant_message(
        self, conversation_id: int, text: str, reply_to_id: int, slack_ts: str | None, owner: str | None = None
    ) -> int:
        """Store an answer and mark its question answered, atomically.

        Done in one transaction so a crash can never leave an answer whose question still looks
        unanswered (and would be answered again) or vice versa. With `owner`, only while the
        question is still that instance's: else `LeaseLostError` and nothing is stored.
        """
        with self._engine.begin() as connection:
            if owner is not None:
                marked = connection.execute(
                    _MARK_ANSWERED_OWNED,
                    {"b_message_id": reply_to_id, "b_conversation_id": conversation_id, "b_owner": owner},
                )
                if marked.rowcount == 0:
                    # A retry after a commit whose reply was lost finds its own answer stored already.
                    existing = connection.execute(_OWN_ANSWER, {"b_question_id": reply_to_id, "b_owner": owner}).first()
                    if existing is not None:
                        return int(existing[0])
                    raise LeaseLostError(f"question {reply_to_id} is no longer {owner}'s to answer")
            else:
                marked = connection.execute(
                    _MARK_ANSWERED, {"b_message_id": reply_to_id, "b_conversation_id": conversation_id}
                )
            if marked.rowcount == 0:
                raise ValueError(
                    f"message {reply_to_id} is not a user message of conversation {conversation_id}"
                )
            now = utcnow()
            answer_id = connection.execute(
                _INSERT_MESSAGE,
                {"conversation_id": conversation_id, "role": "assistant", "text": text, "slack_user": None,
                 "slack_ts": slack_ts, "status": "answered", "reply_to_id": reply_to_id, "created_at": now},
            ).inserted_primary_key[0]
            connection.execute(_TOUCH, {"b_conversation_id": conversation_id, "b_now": now})
            return int(answer_id)

    def history(self, conversation_id: int, before_message_id: int | None = None) -> list[tuple[str, str]]:
        """(question, answer) pairs that were answered, oldest first, for building the prompt."""
        with self._engine.begin() as connection:
            if before_message_id is None:
                rows = connection.execute(_HISTORY, {"conversation_id": conversation_id}).all()
            else:
                rows = connection.execute(
                    _HISTORY_BEFORE, {"conversation_id": conversation_id, "before_id": before_message_id}
                ).all()
        return self._pairs(rows)

    @staticmethod
    def _pairs(rows: Any) -> list[tuple[str, str]]:
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
