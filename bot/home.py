"""The App Home tab: what finbot does, today's term, the user's own questions, and for admins
the last week's figures and controls (see bot/listeners/home.py for the events and clicks).

Everything here is built per user from the database when the tab is opened or after an admin
changes something. Admin figures and controls are only ever put in the view of a user listed in
ADMIN_USER_IDS, and every admin action is checked again when it arrives (`HomeService.is_admin`),
so a forged click from anyone else changes nothing. Text written by people or the model is
escaped before it goes into mrkdwn.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot import messages_ko
from bot.term_of_day import TermOfDayService
from llm.cleaning import strip_control_characters
from storage.answer_timings import AnswerTimingStore
from storage.feedback import FeedbackStore
from storage.models import utcnow
from storage.qa_channels import QAChannelStore
from storage.questions import QuestionStore

logger = logging.getLogger(__name__)

QA_ADD_ACTION = "finbot_home_qa_add"
QA_REMOVE_ACTION = "finbot_home_qa_remove"
TOD_CHANNELS_ACTION = "finbot_home_tod_channels"
TOD_TIME_ACTION = "finbot_home_tod_time"
TOD_RESET_ACTION = "finbot_home_tod_reset"
PIN_OPEN_ACTION = "finbot_home_pin_open"
PIN_REMOVE_ACTION = "finbot_home_pin_remove"
PIN_MODAL_CALLBACK = "finbot_home_pin"
PIN_DATE_BLOCK, PIN_DATE_ACTION = "pin_date", "date"
PIN_TERM_BLOCK, PIN_TERM_ACTION = "pin_term", "term"
ADMIN_ACTIONS = (
    QA_ADD_ACTION, QA_REMOVE_ACTION, TOD_CHANNELS_ACTION, TOD_TIME_ACTION, TOD_RESET_ACTION,
    PIN_OPEN_ACTION, PIN_REMOVE_ACTION,
)

STATS_DAYS = 7
RECENT_QUESTIONS = 5
WORST_ANSWERS = 5
MAX_LISTED = 20  # Q&A channels and pins shown; a Home view holds at most 100 blocks
MAX_PIN_TERM_CHARS = 200  # term_pins.term
_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")


def plain(text: str, limit: int = 80) -> str:
    """People's or the model's text, safe inside mrkdwn (and a link label): one line, escaped."""
    text = " ".join(strip_control_characters(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "¦")


def channel_mention(channel_id: str) -> str:
    # Only a well-formed id becomes a mention; anything else is shown as text.
    return f"<#{channel_id}>" if _CHANNEL_ID.match(channel_id) else plain(channel_id, 40)


def permalink(workspace_url: str | None, channel_id: str, ts: str, thread_ts: str | None = None) -> str | None:
    """Slack's link to a message: https://WORKSPACE.slack.com/archives/C/p<ts without the dot>."""
    if not workspace_url or not _CHANNEL_ID.match(channel_id) or not re.fullmatch(r"\d+\.\d+", ts):
        return None
    link = f"{workspace_url.rstrip('/')}/archives/{channel_id}/p{ts.replace('.', '')}"
    if thread_ts and thread_ts != ts and re.fullmatch(r"\d+\.\d+", thread_ts):
        link += f"?thread_ts={thread_ts}&cid={channel_id}"
    return link


def _section(text: str, accessory: dict[str, Any] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}
    if accessory is not None:
        block["accessory"] = accessory
    return block


def _header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": text[:150], "emoji": True}}


def _button(text: str, action_id: str, value: str = "", style: str | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {
        "type": "button", "action_id": action_id, "text": {"type": "plain_text", "text": text, "emoji": True},
    }
    if value:
        button["value"] = value
    if style:
        button["style"] = style
    return button


@dataclass(frozen=True)
class Actor:
    """Who clicked or opened the tab, from Slack's payload."""

    team_id: str
    user_id: str


class HomeService:
    def __init__(
        self,
        *,
        questions: QuestionStore,
        feedback: FeedbackStore,
        timings: AnswerTimingStore,
        qa_channels: QAChannelStore,
        configured_qa: frozenset[str],
        term_of_day: TermOfDayService | None,
        admins: frozenset[str],
        slash_command: str,
        timezone: str,
    ) -> None:
        self._questions = questions
        self._feedback = feedback
        self._timings = timings
        self._qa_channels = qa_channels
        self._configured_qa = configured_qa
        self._term_of_day = term_of_day
        self._admins = admins
        self._slash_command = slash_command
        self._tz = ZoneInfo(timezone)
        self._workspace_urls: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def is_admin(self, user_id: str | None) -> bool:
        return bool(user_id) and user_id in self._admins

    # ------------------------------------------------------------------ the view

    def publish(self, client: WebClient, actor: Actor) -> None:
        view = self.view(client, actor)
        try:
            client.views_publish(user_id=actor.user_id, view=view)
        except SlackApiError as error:
            logger.warning("could not publish the Home tab of %s: %s", actor.user_id, error.response.get("error"))
            return
        logger.info("Home tab published for %s%s", actor.user_id, " (admin)" if self.is_admin(actor.user_id) else "")

    def view(self, client: WebClient, actor: Actor) -> dict[str, Any]:
        workspace = self._workspace_url(client, actor.team_id)
        blocks: list[dict[str, Any]] = [
            _header(messages_ko.HOME_TITLE),
            _section(messages_ko.HOME_INTRO.format(command=self._slash_command)),
            {"type": "divider"},
            *self._term_blocks(),
            {"type": "divider"},
            *self._recent_blocks(workspace, actor),
        ]
        if self.is_admin(actor.user_id):
            blocks += [{"type": "divider"}, *self._admin_blocks(workspace, actor)]
        return {"type": "home", "blocks": blocks}

    def _workspace_url(self, client: WebClient, team_id: str) -> str | None:
        """The workspace's https://NAME.slack.com/ for message links (auth.test, asked once)."""
        with self._lock:
            if team_id in self._workspace_urls:
                return self._workspace_urls[team_id]
        try:
            url = str(client.auth_test().get("url") or "") or None
        except SlackApiError as error:
            logger.warning("no links in the Home tab: auth.test failed (%s)", error.response.get("error"))
            return None  # asked again next time
        with self._lock:
            self._workspace_urls[team_id] = url
        return url

    def _term_blocks(self) -> list[dict[str, Any]]:
        blocks = [_header(messages_ko.HOME_TERM_TITLE)]
        if self._term_of_day is None:
            return [*blocks, _section(messages_ko.TERM_OF_DAY_NOT_CONFIGURED)]
        try:
            today = self._term_of_day.today_message()
        except Exception as error:
            logger.warning("Home tab: could not read today's term: %s", error)
            return [*blocks, _section(messages_ko.TERM_OF_DAY_LOOKUP_FAILED)]
        if today.blocks is None:
            return [*blocks, _section(today.text)]
        # The post's own blocks (its header names the term), without the divider and the invitation
        # to ask in the post's thread, which is not here.
        invite = messages_ko.TERM_OF_DAY_INVITE
        kept = [
            block for block in today.blocks
            if block["type"] != "divider"
            and not (block["type"] == "context" and any(e.get("text") == invite for e in block.get("elements", [])))
        ]
        return kept

    def _recent_blocks(self, workspace: str | None, actor: Actor) -> list[dict[str, Any]]:
        blocks = [_header(messages_ko.HOME_RECENT_TITLE)]
        asked = self._questions.recent_by_user(actor.team_id, actor.user_id, RECENT_QUESTIONS)
        if not asked:
            return [*blocks, _section(messages_ko.HOME_RECENT_EMPTY)]
        lines = []
        for question in asked:
            label = plain(question.text)
            link = permalink(workspace, question.channel_id, question.slack_ts, question.thread_ts)
            when = question.created_at.astimezone(self._tz).strftime("%m월 %d일 %H:%M")
            status = messages_ko.HOME_STATUS.get(question.status, question.status)
            lines.append(f"• {f'<{link}|{label}>' if link else label} · {status} · {when}")
        return [*blocks, _section("\n".join(lines))]

    def _admin_blocks(self, workspace: str | None, actor: Actor) -> list[dict[str, Any]]:
        since = utcnow() - timedelta(days=STATS_DAYS)
        counts = self._questions.counts_since(since)
        up, down = self._feedback.counts_since(since)
        median = self._timings.median_first_text_ms(since)
        blocks = [
            _header(messages_ko.HOME_ADMIN_TITLE),
            _section(
                messages_ko.HOME_ADMIN_STATS.format(
                    questions=sum(counts.values()),
                    answered=counts.get("answered", 0),
                    failed=counts.get("failed", 0),
                    up=up,
                    down=down,
                    median=f"{median / 1000:.1f}초" if median is not None else messages_ko.HOME_ADMIN_NO_MEDIAN,
                )
            ),
        ]
        worst = self._feedback.worst_rated(since, WORST_ANSWERS)
        lines = [messages_ko.HOME_ADMIN_WORST_TITLE]
        for answer in worst:
            label = plain(answer.question)
            link = permalink(workspace, answer.channel_id, answer.question_ts or answer.thread_ts, answer.thread_ts)
            lines.append(messages_ko.HOME_ADMIN_WORST_ITEM.format(
                link=f"<{link}|{label}>" if link else label, up=answer.ups, down=answer.downs,
            ))
        if not worst:
            lines.append(messages_ko.HOME_ADMIN_WORST_EMPTY)
        blocks.append(_section("\n".join(lines)))
        blocks += self._qa_blocks(actor.team_id)
        blocks += self._term_of_day_blocks()
        return blocks

    def _qa_blocks(self, team_id: str) -> list[dict[str, Any]]:
        blocks = [{"type": "divider"}, _section(messages_ko.HOME_ADMIN_QA_TITLE)]
        stored = self._qa_channels.channels(team_id)[:MAX_LISTED]
        for channel in sorted(self._configured_qa)[:MAX_LISTED]:
            blocks.append(_section(messages_ko.HOME_ADMIN_QA_FROM_ENV.format(channel=channel_mention(channel))))
        for channel in stored:
            if channel in self._configured_qa:
                continue
            blocks.append(_section(
                channel_mention(channel),
                _button(messages_ko.HOME_ADMIN_QA_REMOVE, QA_REMOVE_ACTION, channel, style="danger"),
            ))
        if not stored and not self._configured_qa:
            blocks.append(_section(messages_ko.HOME_ADMIN_QA_EMPTY))
        blocks.append({
            "type": "actions",
            "block_id": "finbot_home_qa",
            "elements": [{
                "type": "channels_select",
                "action_id": QA_ADD_ACTION,
                "placeholder": {"type": "plain_text", "text": messages_ko.HOME_ADMIN_QA_ADD},
            }],
        })
        return blocks

    def _term_of_day_blocks(self) -> list[dict[str, Any]]:
        service = self._term_of_day
        if service is None:
            return []
        config = service.config
        state = messages_ko.HOME_ADMIN_TOD_STATE.format(
            channels=", ".join(channel_mention(c) for c in config.channels) or messages_ko.HOME_ADMIN_TOD_NO_CHANNEL,
            time=config.post_time.strftime("%H:%M"),
            timezone=config.timezone,
            source=messages_ko.HOME_ADMIN_TOD_SOURCE_HOME if service.overridden else messages_ko.HOME_ADMIN_TOD_SOURCE_ENV,
        )
        channels_select: dict[str, Any] = {
            "type": "multi_channels_select",
            "action_id": TOD_CHANNELS_ACTION,
            "placeholder": {"type": "plain_text", "text": messages_ko.HOME_ADMIN_TOD_CHANNELS},
        }
        valid = [c for c in config.channels if _CHANNEL_ID.match(c)]
        if valid:
            channels_select["initial_channels"] = valid
        elements: list[dict[str, Any]] = [
            channels_select,
            {
                "type": "timepicker",
                "action_id": TOD_TIME_ACTION,
                "initial_time": config.post_time.strftime("%H:%M"),
                "placeholder": {"type": "plain_text", "text": messages_ko.HOME_ADMIN_TOD_TIME},
            },
        ]
        if service.overridden:
            elements.append(_button(messages_ko.HOME_ADMIN_TOD_RESET, TOD_RESET_ACTION))
        blocks = [
            {"type": "divider"},
            _section(f"{messages_ko.HOME_ADMIN_TOD_TITLE}\n{state}"),
            {"type": "actions", "block_id": "finbot_home_tod", "elements": elements},
            _section(messages_ko.HOME_ADMIN_PINS_TITLE, _button(messages_ko.HOME_ADMIN_PIN_ADD, PIN_OPEN_ACTION)),
        ]
        pins = service.posts.pins_from(self.today(), MAX_LISTED)
        for day, term in pins:
            blocks.append(_section(
                messages_ko.HOME_ADMIN_PIN_ITEM.format(date=day.isoformat(), term=plain(term, 100)),
                _button(messages_ko.HOME_ADMIN_PIN_REMOVE, PIN_REMOVE_ACTION, day.isoformat()),
            ))
        if not pins:
            blocks.append(_section(messages_ko.HOME_ADMIN_PINS_EMPTY))
        return blocks

    def today(self) -> date:
        if self._term_of_day is not None:
            return self._term_of_day.current_time().date()
        return datetime.now(self._tz).date()

    # ------------------------------------------------------------------ admin actions (caller checked is_admin)

    def qa_channel_on(self, actor: Actor, channel_id: str) -> None:
        if not _CHANNEL_ID.match(channel_id):
            raise ValueError(f"not a channel id: {channel_id!r}")
        added = self._qa_channels.add(actor.team_id, channel_id, actor.user_id)
        logger.info("Q&A channel %s/%s turned on by %s in the Home tab%s", actor.team_id, channel_id, actor.user_id,
                    "" if added else " (already on)")

    def qa_channel_off(self, actor: Actor, channel_id: str) -> None:
        removed = self._qa_channels.remove(actor.team_id, channel_id)
        logger.info("Q&A channel %s/%s turned off by %s in the Home tab%s", actor.team_id, channel_id, actor.user_id,
                    "" if removed else " (was not on)")

    def term_of_day_channels(self, actor: Actor, channels: Sequence[str]) -> None:
        if self._term_of_day is None:
            return
        wanted = [c for c in channels if _CHANNEL_ID.match(c)]
        self._term_of_day.change_settings(channels=wanted, by=actor.user_id)
        logger.info("term of the day channels set to %s by %s", ", ".join(wanted) or "none", actor.user_id)

    def term_of_day_time(self, actor: Actor, hhmm: str) -> None:
        if self._term_of_day is None:
            return
        post_time = time.fromisoformat(hhmm)  # Slack's timepicker sends HH:MM
        self._term_of_day.change_settings(post_time=post_time, by=actor.user_id)
        logger.info("term of the day time set to %s by %s", post_time.strftime("%H:%M"), actor.user_id)

    def term_of_day_reset(self, actor: Actor) -> None:
        if self._term_of_day is not None:
            self._term_of_day.reset_settings(by=actor.user_id)

    def pin_errors(self, day_text: str | None, term: str | None) -> dict[str, str]:
        """What is wrong with a pin the modal submitted, by block id ({} when nothing)."""
        errors: dict[str, str] = {}
        try:
            day = date.fromisoformat(day_text or "")
        except ValueError:
            day = None
        if day is None or day < self.today():
            errors[PIN_DATE_BLOCK] = messages_ko.HOME_PIN_ERROR_PAST
        if not (term or "").strip() or len((term or "").strip()) > MAX_PIN_TERM_CHARS:
            errors[PIN_TERM_BLOCK] = messages_ko.HOME_PIN_ERROR_TERM.format(limit=MAX_PIN_TERM_CHARS)
        return errors

    def pin(self, actor: Actor, day: date, term: str) -> None:
        if self._term_of_day is None:
            return
        self._term_of_day.posts.pin(day, term.strip())
        logger.info("term for %s pinned by %s in the Home tab", day, actor.user_id)

    def unpin(self, actor: Actor, day: date) -> None:
        if self._term_of_day is None:
            return
        removed = self._term_of_day.posts.unpin(day)
        logger.info("pin of %s removed by %s in the Home tab%s", day, actor.user_id, "" if removed else " (none)")

    @staticmethod
    def pin_modal() -> dict[str, Any]:
        return {
            "type": "modal",
            "callback_id": PIN_MODAL_CALLBACK,
            "title": {"type": "plain_text", "text": messages_ko.HOME_PIN_MODAL_TITLE},
            "submit": {"type": "plain_text", "text": messages_ko.HOME_PIN_MODAL_SUBMIT},
            "close": {"type": "plain_text", "text": messages_ko.HOME_PIN_MODAL_CANCEL},
            "blocks": [
                {
                    "type": "input",
                    "block_id": PIN_DATE_BLOCK,
                    "label": {"type": "plain_text", "text": messages_ko.HOME_PIN_MODAL_DATE},
                    "element": {"type": "datepicker", "action_id": PIN_DATE_ACTION},
                },
                {
                    "type": "input",
                    "block_id": PIN_TERM_BLOCK,
                    "label": {"type": "plain_text", "text": messages_ko.HOME_PIN_MODAL_TERM},
                    "element": {"type": "plain_text_input", "action_id": PIN_TERM_ACTION,
                                "max_length": MAX_PIN_TERM_CHARS},
                },
            ],
        }
