"""Optional allow-lists of Slack workspaces and channels (ALLOWED_TEAM_IDS / ALLOWED_CHANNEL_IDS).

A Bolt global middleware: requests from another workspace or channel are acknowledged (so Slack
does not retry them) and dropped before any listener runs. Empty lists allow everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from slack_bolt import BoltRequest, BoltResponse

logger = logging.getLogger(__name__)


def _team_of(body: dict[str, Any]) -> str | None:
    team = body.get("team_id") or body.get("team")
    if isinstance(team, dict):
        team = team.get("id")
    if not team:
        event = body.get("event") or {}
        team = event.get("team") or (body.get("user") or {}).get("team_id")
    return str(team) if team else None


def _channel_of(body: dict[str, Any]) -> str | None:
    event = body.get("event") or {}
    channel = event.get("channel") or body.get("channel_id") or body.get("channel")
    if isinstance(channel, dict):
        channel = channel.get("id")
    if not channel and isinstance(event.get("item"), dict):
        channel = event["item"].get("channel")
    return str(channel) if channel else None


def allowlist_middleware(
    allowed_teams: frozenset[str] = frozenset(), allowed_channels: frozenset[str] = frozenset()
) -> Callable[[BoltRequest, BoltResponse, Callable[[], BoltResponse]], BoltResponse | None]:
    def allowlist(req: BoltRequest, resp: BoltResponse, next: Callable[[], BoltResponse]) -> BoltResponse | None:  # noqa: A002 - Bolt's argument name
        body = req.body or {}
        team = _team_of(body)
        channel = _channel_of(body)
        if allowed_teams and team not in allowed_teams:
            logger.info("ignoring request from workspace %s (not in ALLOWED_TEAM_IDS)", team)
            return BoltResponse(status=200, body="")
        # Requests without a channel (e.g. app_home_opened) are not channel-scoped.
        if allowed_channels and channel is not None and channel not in allowed_channels:
            logger.info("ignoring request in %s/%s (not in ALLOWED_CHANNEL_IDS)", team, channel)
            return BoltResponse(status=200, body="")
        return next()

    return allowlist


def register_allowlist(app: Any, team_ids: frozenset[str], channel_ids: frozenset[str]) -> None:  # noqa: ANN401
    """Add the middleware to a Bolt app when either list is set (nothing otherwise)."""
    if team_ids or channel_ids:
        app.use(allowlist_middleware(team_ids, channel_ids))
