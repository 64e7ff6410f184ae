"""Database schema for conversations, messages and Slack event de-duplication.

The schema is owned by Alembic (see `migrations/`); these models must stay in step with the
latest revision, which `tests/test_migrations.py` checks with autogenerate's comparison.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import (
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names let Alembic find, compare and drop constraints on every backend
# (SQLite batch mode in particular needs named constraints to recreate tables).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

USER_STATUSES: tuple[str, ...] = ("received", "generating", "answered", "failed")
ROLES: tuple[str, ...] = ("user", "assistant")
TERM_POST_STATUSES: tuple[str, ...] = ("claimed", "posted", "failed")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    # Must render exactly as the migrations typed it (e.g. "role IN ('user', 'assistant')"): the
    # constraints already exist, and tests/test_migrations.py compares the texts.
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite has no timezone support and hands back naive datetimes even for
    `DateTime(timezone=True)`; normalising here means callers always get aware UTC values.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; store timezone-aware values only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Conversation(Base):
    """One Slack thread; Slack identifies it by (team, channel, root message ts)."""

    __tablename__ = "conversations"
    __table_args__ = (UniqueConstraint("team_id", "channel_id", "thread_ts"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team_id: Mapped[str] = mapped_column(String(64))
    channel_id: Mapped[str] = mapped_column(String(64))
    thread_ts: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        order_by="Message.id",
        # The database cascades the delete; the ORM must not try to null out the FK first.
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # NULL slack_ts compares unequal, so messages not (yet) posted to Slack never collide.
        UniqueConstraint("conversation_id", "role", "slack_ts"),
        CheckConstraint(_one_of("role", ROLES), name="role"),
        CheckConstraint(_one_of("status", USER_STATUSES), name="status"),
        # The recovery sweep looks for unfinished questions whose lease ran out, every few seconds.
        Index("ix_messages_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        # No separate index: the unique constraint below starts with this column and serves lookups.
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    slack_user: Mapped[str | None] = mapped_column(String(64))
    slack_ts: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="received")
    # SET NULL rather than CASCADE: both rows live in the same conversation, whose deletion removes them anyway.
    reply_to_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL"), index=True
    )
    error: Mapped[str | None] = mapped_column(Text)
    # For a user question: the bot's placeholder/streamed reply message, so an answer interrupted
    # by a restart can be completed in place instead of leaving "답변을 준비하고 있어요…" forever.
    reply_ts: Mapped[str | None] = mapped_column(String(64))
    # For an unfinished question: the instance answering it and until when that claim holds. The
    # owner renews the lease while it works; once it has run out, any instance may take over.
    owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Takeovers so far: a question that kills every process answering it is not retried forever.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")


class ProcessedEvent(Base):
    """Slack event ids already handled; the primary key makes claiming atomic across processes."""

    __tablename__ = "processed_events"

    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Feedback(Base):
    """A 👍/👎 vote on one answer; one vote per user per answer, a second click changes it."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("message_id", "slack_user"),
        CheckConstraint("vote IN (-1, 1)", name="vote"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The assistant message voted on; its reply_to_id leads to the question.
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    slack_user: Mapped[str] = mapped_column(String(64))
    vote: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class TermLookup(Base):
    """Stored answers of /용어 lookups, so a repeated lookup costs no GPU time."""

    __tablename__ = "term_lookups"

    term_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    term: Mapped[str] = mapped_column(String(200))
    answer: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class QAChannel(Base):
    """Channels where every top-level question is answered without a mention."""

    __tablename__ = "qa_channels"

    team_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    added_by: Mapped[str | None] = mapped_column(String(64))
    added_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TermPost(Base):
    """The term of the day in one channel on one date.

    The row is the claim: it is inserted before generation starts, and the unique
    (channel, date) makes a restart, a retried job or a second instance unable to post twice.
    """

    __tablename__ = "term_posts"
    __table_args__ = (
        UniqueConstraint("channel_id", "post_date"),
        CheckConstraint(_one_of("status", TERM_POST_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel_id: Mapped[str] = mapped_column(String(64))
    post_date: Mapped[date] = mapped_column(Date)
    term: Mapped[str] = mapped_column(String(200))
    term_key: Mapped[str] = mapped_column(String(200))
    category: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="claimed")
    explanation: Mapped[str | None] = mapped_column(Text)
    slack_ts: Mapped[str | None] = mapped_column(String(64))
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    posted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class TermPin(Base):
    """An operator's choice of term for a date, in every term-of-the-day channel."""

    __tablename__ = "term_pins"

    post_date: Mapped[date] = mapped_column(Date, primary_key=True)
    term: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AnswerTiming(Base):
    """How long one answered question took, from its event's arrival: for the admins' Home tab."""

    __tablename__ = "answer_timings"

    # The question (a user message); deleted with it by retention.
    question_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    first_text_ms: Mapped[int] = mapped_column(Integer)
    answer_ms: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)
    # The Home tab's statistics cover recent days.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class StoredSetting(Base):
    """An admin's setting made in the Home tab; it overrides the environment's until reset."""

    __tablename__ = "stored_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_by: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
