"""Korean business days across real holiday periods, as the `holidays` package's KR calendar has them."""

from __future__ import annotations

from datetime import date, datetime

import pytest

from bot.business_days import holiday_name, is_business_day, next_business_day


@pytest.mark.parametrize(
    ("day", "expected"),
    [
        (date(2026, 2, 13), True),  # Friday before 설날
        (date(2026, 2, 14), False),  # Saturday
        (date(2026, 2, 15), False),  # Sunday
        (date(2026, 2, 16), False),  # 설날 전날 (Monday)
        (date(2026, 2, 17), False),  # 설날
        (date(2026, 2, 18), False),  # 설날 다음날
        (date(2026, 2, 19), True),  # Thursday after
        (date(2026, 2, 20), True),
    ],
)
def test_seollal_2026(day: date, expected: bool) -> None:
    assert is_business_day(day) is expected


def test_seollal_holiday_names_are_korean() -> None:
    assert holiday_name(date(2026, 2, 17)) == "설날"
    assert holiday_name(date(2026, 2, 16)) == "설날 전날"
    assert holiday_name(date(2026, 2, 13)) is None
    # Weekends are not holidays by name; the business-day check handles them separately.
    assert holiday_name(date(2026, 2, 14)) is None


@pytest.mark.parametrize(
    ("day", "substitute_for"),
    [
        (date(2025, 3, 3), "삼일절"),  # 3/1 was a Saturday
        (date(2024, 5, 6), "어린이날"),  # 5/5 was a Sunday
        (date(2024, 2, 12), "설날"),  # 설날 fell on Saturday
        (date(2025, 10, 8), "추석"),  # 추석 period overlapped 개천절/Sunday
    ],
)
def test_substitute_holidays_are_not_business_days(day: date, substitute_for: str) -> None:
    assert day.weekday() < 5, "a substitute holiday is always on a weekday"
    assert not is_business_day(day)
    name = holiday_name(day)
    assert name is not None and substitute_for in name and "대체" in name


def test_chuseok_2025_long_break() -> None:
    # 개천절 (Fri 10/3), weekend, 추석 10/5-7, 대체 10/8, 한글날 10/9: the next business day is Fri 10/10.
    for day in (
        date(2025, 10, 3),
        date(2025, 10, 6),
        date(2025, 10, 7),
        date(2025, 10, 8),
        date(2025, 10, 9),
    ):
        assert not is_business_day(day), day
    assert is_business_day(date(2025, 10, 2))
    assert next_business_day(date(2025, 10, 2)) == date(2025, 10, 10)


def test_chuseok_2026() -> None:
    assert not is_business_day(date(2026, 9, 24))
    assert not is_business_day(date(2026, 9, 25))
    assert holiday_name(date(2026, 9, 25)) == "추석"
    assert next_business_day(date(2026, 9, 23)) == date(2026, 9, 28)


def test_two_holidays_on_one_day_are_both_named() -> None:
    name = holiday_name(date(2025, 5, 5))
    assert name is not None and "어린이날" in name and "부처님오신날" in name


def test_ordinary_weekdays_and_weekends() -> None:
    assert is_business_day(date(2026, 3, 4))  # Wednesday
    assert not is_business_day(date(2026, 3, 7))  # Saturday
    assert not is_business_day(date(2026, 3, 8))  # Sunday
    assert next_business_day(date(2026, 3, 6)) == date(2026, 3, 9)  # Friday -> Monday
    assert next_business_day(date(2026, 3, 4)) == date(2026, 3, 5)  # strictly after


def test_next_business_day_crosses_seollal_and_year_end() -> None:
    assert next_business_day(date(2026, 2, 13)) == date(2026, 2, 19)
    # Thu 2025-12-31 -> 2026-01-01 is 신정 -> Fri 2026-01-02.
    assert next_business_day(date(2025, 12, 31)) == date(2026, 1, 2)


def test_settings_turn_weekends_and_holidays_back_on() -> None:
    saturday, seollal, seollal_on_weekend = date(2026, 2, 14), date(2026, 2, 17), date(2024, 2, 10)
    assert is_business_day(saturday, include_weekends=True)
    assert not is_business_day(seollal, include_weekends=True)
    assert is_business_day(seollal, include_holidays=True)
    assert not is_business_day(saturday, include_holidays=True)
    # A holiday on a Saturday needs both switches.
    assert not is_business_day(seollal_on_weekend, include_weekends=True)
    assert not is_business_day(seollal_on_weekend, include_holidays=True)
    assert is_business_day(seollal_on_weekend, include_weekends=True, include_holidays=True)
    assert next_business_day(date(2026, 2, 13), include_weekends=True) == date(2026, 2, 14)
    assert next_business_day(date(2026, 2, 15), include_holidays=True) == date(2026, 2, 16)
    assert next_business_day(date(2026, 2, 13), include_weekends=True, include_holidays=True) == date(
        2026, 2, 14
    )


def test_datetime_is_treated_as_its_calendar_day() -> None:
    assert not is_business_day(datetime(2026, 2, 17, 9, 0))
    assert holiday_name(datetime(2026, 2, 17, 23, 59)) == "설날"
    assert next_business_day(datetime(2026, 2, 13, 9, 0)) == date(2026, 2, 19)
