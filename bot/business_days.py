"""Korean business days for the scheduled term of the day: no weekends, no public holidays.

Holidays come from the `holidays` package's South Korea calendar, which includes 대체공휴일
(substitute holidays), election days and 임시공휴일 designated by the government, so nothing is
hard-coded here; updating the package updates the calendar.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from functools import lru_cache

import holidays

# Enough to cross any run of Korean holidays plus weekends; a bound keeps a misconfigured call from
# looping forever.
_MAX_SEARCH_DAYS = 366


@lru_cache(maxsize=32)
def _korean_holidays(year: int) -> holidays.HolidayBase:
    # One object per year, built once: constructing the calendar is far slower than a lookup, and a
    # year-bound object never expands (mutates) on lookup, which keeps it safe to share across threads.
    return holidays.country_holidays("KR", years=year, language="ko")


def _as_date(day: date) -> date:
    # datetime is a subclass of date; drop the time so comparisons and cache keys are by calendar day.
    return day.date() if isinstance(day, datetime) else day


def holiday_name(day: date) -> str | None:
    """The Korean name of the public holiday on `day` (several joined with ", "), or None."""
    day = _as_date(day)
    names = _korean_holidays(day.year).get_list(day)
    return ", ".join(names) if names else None


def is_business_day(day: date, include_weekends: bool = False, include_holidays: bool = False) -> bool:
    """True when the term of the day should be posted on `day`.

    `include_weekends` / `include_holidays` turn Saturdays and Sundays / public holidays back into
    posting days, for teams that want a term every day.
    """
    day = _as_date(day)
    if not include_weekends and day.weekday() >= 5:
        return False
    return include_holidays or day not in _korean_holidays(day.year)


def next_business_day(day: date, *, include_weekends: bool = False, include_holidays: bool = False) -> date:
    """The first business day strictly after `day`."""
    candidate = _as_date(day)
    for _ in range(_MAX_SEARCH_DAYS):
        candidate += timedelta(days=1)
        if is_business_day(candidate, include_weekends=include_weekends, include_holidays=include_holidays):
            return candidate
    raise RuntimeError(f"no business day within {_MAX_SEARCH_DAYS} days after {day}")  # pragma: no cover
