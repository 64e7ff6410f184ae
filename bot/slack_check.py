"""Asking Slack whether finbot's tokens work: for `finbot run` before it loads the model, and `finbot doctor`.

A refused token is a mistake to fix (said in one line, with where to get the right token); a
Slack that cannot be reached is often a passing thing (the network comes up after finbot, an
outage), so `finbot run` waits for it with backoff, saying so, for SLACK_STARTUP_TIMEOUT_S.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.error import HTTPError, URLError

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.errors import EXIT_USAGE, FinbotError, first_line
from bot.settings import FinbotSettings

logger = logging.getLogger(__name__)

# Errors that mean "this token will never work": waiting does not help.
REFUSED_TOKEN_ERRORS = frozenset(
    {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
     "not_allowed_token_type", "no_permission", "missing_scope", "invalid_token", "ekm_access_denied",
     "team_access_not_granted", "app_missing_action_url"}
)
_TRANSIENT_ERRORS = frozenset({"ratelimited", "service_unavailable", "internal_error", "fatal_error",
                               "request_timeout"})
# One Web API call waits at most this long: a doctor or a start-up check must not hang.
CALL_TIMEOUT_S = 10


def token_fix(setting: str, code: str | None, token: str | None) -> str:
    """Where to get a working token, given Slack's refusal `code`."""
    if setting == "SLACK_BOT_TOKEN":
        if token and token.startswith("xapp-"):
            return "SLACK_BOT_TOKEN holds the app-level token (xapp-…); it needs the Bot User OAuth Token (xoxb-…)"
        if token and token.startswith("xoxp-"):
            return "SLACK_BOT_TOKEN holds a user token (xoxp-…); it needs the Bot User OAuth Token (xoxb-…)"
        if code in ("token_revoked", "account_inactive", "token_expired"):
            return "reinstall the app to the workspace and copy its new Bot User OAuth Token (xoxb-…)"
        return "copy the Bot User OAuth Token (xoxb-…) from the app's OAuth & Permissions page"
    if token and token.startswith("xoxb-"):
        return "SLACK_APP_TOKEN holds the bot token (xoxb-…); it needs an app-level token (xapp-…)"
    return (
        "create an App-Level Token with the connections:write scope (Basic Information → App-Level Tokens) "
        "and copy it (xapp-…)"
    )


def web_client(token: str | None, settings: FinbotSettings) -> WebClient:
    """A client without the bot's long retries: these checks decide themselves how long to wait."""
    return WebClient(token=token, base_url=settings.slack_api_url, timeout=CALL_TIMEOUT_S, retry_handlers=[])


def transient_reason(error: BaseException) -> str | None:
    """Why Slack could not answer (unreachable, 5xx, rate limit), or None when it refused."""
    if isinstance(error, SlackApiError):
        status = error.response.status_code or 0
        code = error.response.get("error") if isinstance(error.response.data, dict) else None
        if status >= 500 or status == 429 or code in _TRANSIENT_ERRORS:
            return f"HTTP {status}" + (f" {code}" if code else "")
        return None
    if isinstance(error, HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, URLError):
        return str(error.reason)
    if isinstance(error, (TimeoutError, OSError)):
        return first_line(error)
    return None


def error_code(error: SlackApiError) -> str:
    data = error.response.data
    return str(data.get("error")) if isinstance(data, dict) and data.get("error") else f"HTTP {error.response.status_code}"


@dataclass(frozen=True)
class SlackIdentity:
    user: str
    team: str
    team_id: str
    scopes: frozenset[str] | None  # None: Slack did not say (no X-OAuth-Scopes header)


def auth_test(client: WebClient) -> SlackIdentity:
    response = client.auth_test()
    headers = {key.lower(): value for key, value in (response.headers or {}).items()}
    raw = headers.get("x-oauth-scopes")
    if isinstance(raw, list):
        raw = ",".join(raw)
    scopes = frozenset(scope.strip() for scope in raw.split(",") if scope.strip()) if raw is not None else None
    return SlackIdentity(str(response.get("user")), str(response.get("team")), str(response.get("team_id")), scopes)


def wait_for_slack(
    settings: FinbotSettings,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> SlackIdentity:
    """Check the bot token (and, in Socket Mode, the app-level token) before the model is loaded.

    Raises `FinbotError` at once for a refused token; retries an unreachable Slack with backoff
    (1, 2, 4, … 15 s; one WARNING line each) until SLACK_STARTUP_TIMEOUT_S, then raises it.
    """
    assert settings.slack_bot_token is not None  # checked by missing_slack_settings before
    bot_token = settings.slack_bot_token.get_secret_value()
    app_token = settings.slack_app_token.get_secret_value() if settings.slack_app_token else None
    started = clock()
    failures = 0
    while True:
        checking = "SLACK_BOT_TOKEN"
        try:
            identity = auth_test(web_client(bot_token, settings))
            if settings.slack_mode == "socket":
                checking = "SLACK_APP_TOKEN"
                web_client(app_token, settings).apps_connections_open(app_token=app_token)
            return identity
        except SlackApiError as error:
            reason = transient_reason(error)
            if reason is None:
                failed, code = checking, error_code(error)
                token = bot_token if failed == "SLACK_BOT_TOKEN" else app_token
                raise FinbotError(
                    f"Slack refused {failed} ({code}): {token_fix(failed, code, token)}",
                    EXIT_USAGE,
                ) from None
        except (URLError, OSError) as error:
            reason = transient_reason(error) or first_line(error)
        failures += 1
        delay = min(2.0 ** (failures - 1), 15.0)
        waited = clock() - started
        if waited + delay > settings.slack_startup_timeout_s:
            raise FinbotError(
                f"Slack unreachable at SLACK_API_URL={settings.slack_api_url} ({reason}); gave up after "
                f"{failures} attempt(s) in {waited:.0f} s (SLACK_STARTUP_TIMEOUT_S={settings.slack_startup_timeout_s:g}). "
                "Check the network or proxy (HTTPS_PROXY) and SLACK_API_URL"
            )
        logger.warning(
            "Slack unreachable at %s (%s); retrying in %.0f s (attempt %d)",
            settings.slack_api_url, reason, delay, failures + 1,
        )
        sleep(delay)
