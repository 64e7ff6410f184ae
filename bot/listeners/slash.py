"""The term lookup slash command (`/term 환율`, name from SLASH_COMMAND) and its subcommands.

Subcommands are dispatched through a registry so other features can add their own::

    from bot.listeners.slash import SlashRequest, register_subcommand

    def today(request: SlashRequest) -> None:      # runs on Bolt's listener thread, after ack()
        request.respond(text="...", response_type="in_channel")

    register_subcommand("오늘", today)               # `/term 오늘`

A handler gets the already-acknowledged request; anything slow (the engine!) must go to a
background worker (e.g. `AnswerService.run_in_background`) and answer through `request.respond`
(the response_url, valid for 30 minutes) or `request.client`. Text that is no registered
subcommand is looked up as a term.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from slack_bolt import Ack, App, Respond
from slack_sdk import WebClient

from bot import messages_ko
from bot.formatting import to_mrkdwn
from bot.replies import AnswerService
from bot.term_catalog import Term, find_term, normalize_term_key
from storage.qa_channels import QAChannelStore
from storage.term_lookups import TermLookupStore

logger = logging.getLogger(__name__)

REGENERATE_ACTION = "finbot_term_regenerate"
MAX_TERM_CHARS = 60
# A dedicated instruction: short, definition first. encode_prompt wraps it in the seed's [INST]…[/INST].
TERM_PROMPT = (
    "금융 용어 '{term}'의 뜻을 설명해 주세요. 첫 문장은 '{term}'(이)란 무엇인지 정의하는 한 문장으로 쓰고, "
    "이어서 쉬운 예시나 보충 설명을 한두 문장만 덧붙여 주세요."
)


@dataclass(frozen=True)
class SlashRequest:
    """One slash command invocation, after ack()."""

    command: str  # as typed, e.g. "/term"
    args: str  # the text after the subcommand (its first word)
    text: str  # the whole text after the command
    team_id: str
    channel_id: str
    user_id: str
    client: WebClient
    respond: Respond


SubcommandHandler = Callable[[SlashRequest], None]
SUBCOMMANDS: dict[str, SubcommandHandler] = {}


def _normalize_subcommand(name: str) -> str:
    return unicodedata.normalize("NFC", name).strip().lower()


def register_subcommand(name: str, handler: SubcommandHandler) -> None:
    """Make `/term NAME ...` call `handler(request)` (a later registration of NAME replaces it)."""
    key = _normalize_subcommand(name)
    if not key or any(ch.isspace() for ch in key):
        raise ValueError(f"subcommand names are single words, got {name!r}")
    SUBCOMMANDS[key] = handler


def parse_text(text: str) -> tuple[str, str]:
    parts = unicodedata.normalize("NFC", text).strip().split(maxsplit=1)
    if not parts:
        return "", ""
    return parts[0], parts[1] if len(parts) > 1 else ""


class TermLookupService:
    """Explains terms, reusing a stored explanation while it is younger than `max_age`."""

    def __init__(
        self,
        answers: AnswerService,
        lookups: TermLookupStore,
        terms: Sequence[Term],
        max_age: timedelta | None,
        visibility: Literal["channel", "ephemeral"],
    ) -> None:
        self._answers = answers
        self._lookups = lookups
        self._terms = terms
        self._max_age = max_age
        self._response_type = "in_channel" if visibility == "channel" else "ephemeral"

    def identify(self, text: str) -> tuple[str, str]:
        """(term key, display name); catalog aliases share the catalog term's key."""
        term = find_term(self._terms, text)
        if term is not None:
            return term.key, term.term
        return normalize_term_key(text), " ".join(text.split())

    def lookup(self, request: SlashRequest, text: str) -> None:
        if len(text) > MAX_TERM_CHARS:
            request.respond(text=messages_ko.TERM_TOO_LONG, response_type="ephemeral")
            return
        key, name = self.identify(text)
        cached = self._lookups.get(key, self._max_age)
        if cached is not None:
            logger.info("term %r served from the stored answer (channel %s)", key, request.channel_id)
            request.respond(**self.message(cached.term, key, cached.answer, cached=True))
            return
        request.respond(text=messages_ko.TERM_LOOKING_UP.format(term=name), response_type="ephemeral")
        self._answers.run_in_background(self._generate_and_respond, request.respond, key, name, False)

    def regenerate(self, respond: Respond, key: str, name: str) -> None:
        self._answers.run_in_background(self._generate_and_respond, respond, key, name, True)

    def _generate_and_respond(self, respond: Respond, key: str, name: str, replace: bool) -> None:
        try:
            answer = self._answers.generate(TERM_PROMPT.format(term=name))
        except Exception:
            logger.exception("term lookup of %r failed", key)
            respond(text=messages_ko.TERM_FAILED.format(term=name), response_type="ephemeral")
            return
        if not answer:
            respond(text=messages_ko.TERM_FAILED.format(term=name), response_type="ephemeral")
            return
        self._lookups.put(key, name, answer)
        logger.info("term %r explained (%d chars)", key, len(answer))
        message = self.message(name, key, answer, cached=False)
        if replace:
            message["replace_original"] = True
        respond(**message)

    def message(self, name: str, key: str, answer: str, cached: bool) -> dict[str, Any]:
        text = messages_ko.TERM_ANSWER.format(term=to_mrkdwn(name), answer=to_mrkdwn(answer))
        blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}]
        if cached:
            blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": messages_ko.TERM_CACHED_NOTE}]})
        blocks.append(
            {
                "type": "actions",
                "block_id": "finbot_term",
                "elements": [
                    {
                        "type": "button",
                        "action_id": REGENERATE_ACTION,
                        "text": {"type": "plain_text", "text": messages_ko.TERM_REGENERATE, "emoji": True},
                        "value": json.dumps({"key": key, "term": name}, ensure_ascii=False),
                    }
                ],
            }
        )
        return {"text": text, "blocks": blocks, "response_type": self._response_type}


def _usage(request: SlashRequest) -> None:
    request.respond(text=messages_ko.TERM_USAGE.format(command=request.command), response_type="ephemeral")


def _qa_channel_handler(qa_channels: QAChannelStore) -> SubcommandHandler:
    def handle(request: SlashRequest) -> None:
        action = request.args.strip()
        if action in ("켜기", "on", "등록"):
            added = qa_channels.add(request.team_id, request.channel_id, request.user_id)
            logger.info("Q&A channel %s/%s turned on by %s", request.team_id, request.channel_id, request.user_id)
            text = messages_ko.QA_CHANNEL_ON if added else messages_ko.QA_CHANNEL_ALREADY_ON
            request.respond(text=text, response_type="in_channel" if added else "ephemeral")
        elif action in ("끄기", "off", "해제"):
            removed = qa_channels.remove(request.team_id, request.channel_id)
            logger.info("Q&A channel %s/%s turned off by %s", request.team_id, request.channel_id, request.user_id)
            text = messages_ko.QA_CHANNEL_OFF if removed else messages_ko.QA_CHANNEL_NOT_ON
            request.respond(text=text, response_type="in_channel" if removed else "ephemeral")
        else:
            request.respond(text=messages_ko.QA_CHANNEL_USAGE.format(command=request.command), response_type="ephemeral")

    return handle


def register(app: App, command: str, terms: TermLookupService, qa_channels: QAChannelStore) -> None:
    register_subcommand("도움말", _usage)
    register_subcommand("help", _usage)
    register_subcommand("질문채널", _qa_channel_handler(qa_channels))

    @app.command(command)
    def on_command(ack: Ack, command: dict[str, Any], client: WebClient, respond: Respond) -> None:
        ack()  # within Slack's 3 seconds, whatever follows
        text = command.get("text") or ""
        subcommand, args = parse_text(text)
        request = SlashRequest(
            command=command.get("command") or "/term",
            args=args,
            text=text.strip(),
            team_id=command.get("team_id") or "unknown-team",
            channel_id=command.get("channel_id") or "",
            user_id=command.get("user_id") or "",
            client=client,
            respond=respond,
        )
        if not subcommand:
            _usage(request)
            return
        handler = SUBCOMMANDS.get(_normalize_subcommand(subcommand))
        if handler is not None:
            handler(request)
            return
        terms.lookup(request, request.text)
