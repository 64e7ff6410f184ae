"""The App Home tab's events and clicks: `app_home_opened` publishes the tab; admin controls act at once.

Every admin action is checked here, on the server, against ADMIN_USER_IDS: the controls are only
in admins' views, but a payload can be forged, so one from anyone else is refused (a WARNING
line) and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date
from typing import Any

from slack_bolt import Ack, App
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from sqlalchemy.exc import SQLAlchemyError

from bot import messages_ko
from bot.home import (
    ADMIN_ACTIONS,
    PIN_DATE_ACTION,
    PIN_DATE_BLOCK,
    PIN_MODAL_CALLBACK,
    PIN_OPEN_ACTION,
    PIN_REMOVE_ACTION,
    PIN_TERM_ACTION,
    PIN_TERM_BLOCK,
    QA_ADD_ACTION,
    QA_REMOVE_ACTION,
    TOD_CHANNELS_ACTION,
    TOD_RESET_ACTION,
    TOD_TIME_ACTION,
    Actor,
    HomeService,
)

logger = logging.getLogger(__name__)

AdminHandler = Callable[[HomeService, Actor, dict[str, Any], dict[str, Any], WebClient], None]


def actor_of(body: dict[str, Any]) -> Actor:
    user = body.get("user") or {}
    team = (body.get("team") or {}).get("id") or user.get("team_id") or body.get("team_id") or "unknown-team"
    return Actor(team_id=str(team), user_id=str(user.get("id") or ""))


def _qa_add(home: HomeService, actor: Actor, action: dict[str, Any], body: dict[str, Any], client: WebClient) -> None:
    if action.get("selected_channel"):
        home.qa_channel_on(actor, str(action["selected_channel"]))


def _qa_remove(home: HomeService, actor: Actor, action: dict[str, Any], body: dict[str, Any], client: WebClient) -> None:
    home.qa_channel_off(actor, str(action.get("value") or ""))


def _tod_channels(
    home: HomeService, actor: Actor, action: dict[str, Any], body: dict[str, Any], client: WebClient
) -> None:
    home.term_of_day_channels(actor, [str(c) for c in action.get("selected_channels") or []])


def _tod_time(home: HomeService, actor: Actor, action: dict[str, Any], body: dict[str, Any], client: WebClient) -> None:
    if action.get("selected_time"):
        home.term_of_day_time(actor, str(action["selected_time"]))


def _tod_reset(home: HomeService, actor: Actor, action: dict[str, Any], body: dict[str, Any], client: WebClient) -> None:
    home.term_of_day_reset(actor)


def _pin_open(home: HomeService, actor: Actor, action: dict[str, Any], body: dict[str, Any], client: WebClient) -> None:
    client.views_open(trigger_id=body.get("trigger_id"), view=home.pin_modal())


def _pin_remove(home: HomeService, actor: Actor, action: dict[str, Any], body: dict[str, Any], client: WebClient) -> None:
    home.unpin(actor, date.fromisoformat(str(action.get("value") or "")))


HANDLERS: dict[str, AdminHandler] = {
    QA_ADD_ACTION: _qa_add,
    QA_REMOVE_ACTION: _qa_remove,
    TOD_CHANNELS_ACTION: _tod_channels,
    TOD_TIME_ACTION: _tod_time,
    TOD_RESET_ACTION: _tod_reset,
    PIN_OPEN_ACTION: _pin_open,
    PIN_REMOVE_ACTION: _pin_remove,
}
assert set(HANDLERS) == set(ADMIN_ACTIONS)


def register(app: App, home: HomeService) -> None:
    @app.event("app_home_opened")
    def on_home_opened(event: dict[str, Any], body: dict[str, Any], client: WebClient) -> None:
        if event.get("tab", "home") != "home":
            return  # the Messages tab: nothing to publish
        team = body.get("team_id") or event.get("team") or "unknown-team"
        home.publish(client, Actor(team_id=str(team), user_id=str(event.get("user") or "")))

    def on_admin_action(ack: Ack, body: dict[str, Any], action: dict[str, Any], client: WebClient) -> None:
        ack()
        actor = actor_of(body)
        action_id = str(action.get("action_id"))
        if not home.is_admin(actor.user_id):
            logger.warning("refused Home tab action %s from %s: not in ADMIN_USER_IDS", action_id, actor.user_id)
            return
        try:
            HANDLERS[action_id](home, actor, action, body, client)
        except (ValueError, SlackApiError) as error:
            logger.warning("Home tab action %s by %s failed: %s", action_id, actor.user_id, error)
        if action_id != PIN_OPEN_ACTION:  # the modal's submission republishes
            home.publish(client, actor)

    for action_id in ADMIN_ACTIONS:
        app.action(action_id)(on_admin_action)

    @app.view(PIN_MODAL_CALLBACK)
    def on_pin_submitted(ack: Ack, body: dict[str, Any], view: dict[str, Any], client: WebClient) -> None:
        actor = actor_of(body)
        if not home.is_admin(actor.user_id):
            logger.warning("refused Home tab pin from %s: not in ADMIN_USER_IDS", actor.user_id)
            ack(response_action="errors", errors={PIN_TERM_BLOCK: messages_ko.HOME_ADMIN_ONLY})
            return
        values = (view.get("state") or {}).get("values") or {}
        day_text = ((values.get(PIN_DATE_BLOCK) or {}).get(PIN_DATE_ACTION) or {}).get("selected_date")
        term = ((values.get(PIN_TERM_BLOCK) or {}).get(PIN_TERM_ACTION) or {}).get("value")
        if errors := home.pin_errors(day_text, term):
            ack(response_action="errors", errors=errors)
            return
        # Saved before the ack: the modal closes only once the pin is stored, so a reload always shows it.
        try:
            home.pin(actor, date.fromisoformat(str(day_text)), str(term))
        except SQLAlchemyError as error:
            logger.warning("Home tab pin by %s could not be saved: %s", actor.user_id, error)
            ack(response_action="errors", errors={PIN_TERM_BLOCK: messages_ko.HOME_PIN_ERROR_SAVE})
            return
        ack()
        home.publish(client, actor)
