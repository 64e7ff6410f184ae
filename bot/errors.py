"""Ordinary mistakes told in one line each: what is wrong, where (the setting or the argument), how to fix it.

A wrong setting, a database or Slack that cannot be reached, a model that cannot be found or a
folder that cannot be written are not bugs: the operator gets one clear line, never a Python
traceback. The `finbot` command (bot/cli.py) raises `FinbotError` for them and prints its
message; the helpers here turn library exceptions into such lines.
"""

from __future__ import annotations

import re
from typing import Any

# Exit status of a command interrupted with Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
# A wrong setting or argument: nothing was tried.
EXIT_USAGE = 2
# Something the command needs failed (database, Slack, model, a file).
EXIT_FAILED = 1


class FinbotError(Exception):
    """An ordinary mistake: printed as one line (`finbot: <message>`), the command exits `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Patterns whose regular expression means nothing to an operator: said in words instead.
_PATTERN_HINTS = {
    "term_of_day_time": "must be HH:MM on a 24-hour clock, e.g. 09:00",
    "slash_command": "must be / and up to 31 lowercase characters without spaces, e.g. /term",
}
_SECRET_FIELDS = frozenset({"slack_bot_token", "slack_app_token", "slack_signing_secret", "openai_api_key"})


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _requirement(field: str, error: dict[str, Any]) -> str:
    """What the setting must be, in words, for one pydantic error."""
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    if kind == "greater_than_equal":
        return f"must be ≥ {_number(ctx.get('ge'))}"
    if kind == "greater_than":
        return f"must be > {_number(ctx.get('gt'))}"
    if kind == "less_than_equal":
        return f"must be ≤ {_number(ctx.get('le'))}"
    if kind == "less_than":
        return f"must be < {_number(ctx.get('lt'))}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return "must be a number"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}".replace("' or '", "', '")
    if kind == "string_pattern_mismatch":
        return _PATTERN_HINTS.get(field, f"must match {ctx.get('pattern')}")
    message = str(error.get("msg", "is invalid"))
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def describe_settings_error(error: Any) -> list[str]:
    """One line per invalid setting of a pydantic `ValidationError` from `FinbotSettings()`.

    E.g. ``MAX_NEW_TOKENS=-5 is invalid: must be ≥ 1``. Secrets are never echoed back.
    """
    lines = []
    for item in error.errors(include_url=False):
        location = item.get("loc") or ()
        if not location:  # a rule between several settings: its message names them
            lines.append(_requirement("", item))
            continue
        field = str(location[0])
        name = field.upper()
        value = item.get("input")
        shown = "…" if field in _SECRET_FIELDS else value if isinstance(value, str) else repr(value)
        if field == "database_url" and isinstance(value, str):
            shown = redact_url(value)
        lines.append(f"{name}={shown} is invalid: {_requirement(field, item)}")
    return lines


def redact_url(url: str) -> str:
    """A URL fit for a message: the password of ``scheme://user:password@host`` replaced by ***.

    Done on the text, so that a URL too malformed for SQLAlchemy to parse is still redacted.
    """
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (drivers add hints and SQL on later lines)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def describe_database_error(url: str, error: BaseException) -> str:
    """One line for a database that cannot be opened, migrated or read."""
    from sqlalchemy.exc import DBAPIError

    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    reason = first_line(cause)
    where = f"DATABASE_URL={redact_url(url)}"
    lowered = reason.lower()
    if "unable to open database file" in lowered or isinstance(error, PermissionError):
        return f"cannot open the database {where}: {reason} (does the folder exist and is it writable?)"
    if "file is not a database" in lowered:
        return f"cannot use the database {where}: {reason} (the file is not a SQLite database finbot made)"
    if "can't locate revision" in lowered:
        return (
            f"the database {where} is at a revision this finbot does not know ({reason}); "
            "was it migrated by a newer finbot?"
        )
    return f"cannot use the database {where}: {reason}"
