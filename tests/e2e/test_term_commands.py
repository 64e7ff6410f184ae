"""`finbot term` as an editor uses it: pins listed and removed, empty lists said in Korean, warnings
for pins that will never be posted, a dry run without any channel, help for every argument."""

from __future__ import annotations

import argparse
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from bot.business_days import is_business_day
from bot.cli import build_parser
from tests.e2e.process import run_finbot

pytestmark = pytest.mark.e2e


def _next(day: date, posting: bool) -> date:
    """The first day from `day` on that is (or is not) a Korean business day."""
    while is_business_day(day) != posting:
        day += timedelta(days=1)
    return day


@pytest.fixture
def term(tmp_path):
    settings = {"DATABASE_URL": f"sqlite:///{tmp_path / 'finbot.db'}"}

    def run(*args: str, **extra: str):  # noqa: ANN202
        result = run_finbot("term", *args, cwd=tmp_path, **{**settings, **extra})
        assert "Traceback" not in result.stdout + result.stderr, result.stderr
        return result

    return run


def test_empty_lists_say_so_in_korean(term):
    history = term("history")
    assert (history.returncode, history.stdout) == (0, "아직 게시된 용어가 없어요.\n")
    in_channel = term("history", "--channel", "C1")
    assert in_channel.stdout == "C1 채널에는 아직 게시된 용어가 없어요.\n"
    pins = term("pins")
    assert pins.returncode == 0 and pins.stdout.startswith("아직 고정된 용어가 없어요.")


def test_pins_are_listed_warned_about_and_removed(term):
    today = datetime.now(ZoneInfo("Asia/Seoul")).date()
    posting_day = _next(today + timedelta(days=7), posting=True)
    day_off = _next(today + timedelta(days=7), posting=False)
    past = today - timedelta(days=3)

    fine = term("pin", posting_day.isoformat(), "기준금리")
    assert fine.returncode == 0 and fine.stdout.strip() == f"pinned 기준금리 for {posting_day}"
    assert "warning" not in fine.stderr  # none for a future business day

    off = term("pin", day_off.isoformat(), "환율")
    assert off.returncode == 0 and f"warning: {day_off} is a " in off.stderr and "nothing is posted that day" in off.stderr
    old = term("pin", past.isoformat(), "인플레이션")
    assert old.returncode == 0 and f"warning: {past} is in the past" in old.stderr
    # The same day off is posted when the settings say so: no warning then.
    allowed = term("pin", day_off.isoformat(), "환율",
                   TERM_OF_DAY_INCLUDE_WEEKENDS="true", TERM_OF_DAY_INCLUDE_HOLIDAYS="true")
    assert "warning" not in allowed.stderr

    upcoming = term("pins").stdout.splitlines()
    assert upcoming == sorted(upcoming)
    assert f"{posting_day}  기준금리" in upcoming
    assert any(line.startswith(f"{day_off}  환율  (not posted: ") for line in upcoming)
    assert not any(line.startswith(str(past)) for line in upcoming)
    assert f"{past}  인플레이션  (past)" in term("pins", "--all").stdout.splitlines()

    removed = term("unpin", posting_day.isoformat())
    assert removed.returncode == 0 and f"unpinned 기준금리 from {posting_day}" in removed.stdout
    assert f"{posting_day}" not in term("pins").stdout
    again = term("unpin", posting_day.isoformat())
    assert again.returncode == 1 and f"{posting_day}에 고정된 용어가 없어요" in again.stderr


def test_dry_run_shows_the_term_without_a_channel(term):
    today = datetime.now(ZoneInfo("Asia/Seoul")).date()
    assert term("pin", today.isoformat(), "기준금리").returncode == 0
    result = term("today", "--dry-run", TERM_OF_DAY_INCLUDE_WEEKENDS="true", TERM_OF_DAY_INCLUDE_HOLIDAYS="true")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{today}: would post 기준금리 (통화정책)"]
    assert "TERM_OF_DAY_CHANNELS is empty" in result.stderr


def _actions(parser: argparse.ArgumentParser, path: str = "finbot"):  # noqa: ANN202 - yields (path, action)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_argument_has_help_text():
    missing = [f"{path} {action.dest}" for path, action in _actions(build_parser()) if not action.help]
    assert missing == []
