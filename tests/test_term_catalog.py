"""The shipped term catalog, key normalisation, and the no-repeat choice of the term of the day."""

from __future__ import annotations

import unicodedata
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import pytest

from bot.term_catalog import (
    CATEGORIES,
    OTHER_CATEGORY,
    Term,
    TermCatalog,
    choose_next_term,
    find_term,
    load_terms,
    normalize_term_key,
    term_aliases,
)

START = date(2026, 1, 5)


@pytest.fixture(scope="module")
def catalog() -> list[Term]:
    return load_terms()


def simulate(terms: list[Term], days: int, start: date = START) -> list[Term]:
    """Post once a day, feeding each day's history back in, as the scheduler will."""
    history: list[str] = []
    chosen: list[Term] = []
    for offset in range(days):
        term = choose_next_term(terms, history, start + timedelta(days=offset))
        chosen.append(term)
        history.append(term.term)
    return chosen


# --- the shipped catalog -------------------------------------------------------------------------


def test_catalog_size_and_distinct_terms(catalog: list[Term]) -> None:
    assert len(catalog) >= 365
    keys = [t.key for t in catalog]
    assert len(set(keys)) == len(keys)
    aliases = [alias for t in catalog for alias in term_aliases(t.term)]
    assert len(set(aliases)) == len(aliases), "near-duplicates (same term with/without parentheses)"


def test_catalog_categories(catalog: list[Term]) -> None:
    counts = Counter(t.category for t in catalog)
    assert set(counts) == set(CATEGORIES)
    assert min(counts.values()) >= 15, counts
    assert OTHER_CATEGORY not in CATEGORIES


def test_catalog_entries_are_clean(catalog: list[Term]) -> None:
    for term in catalog:
        assert term.term == term.term.strip() and term.term
        assert unicodedata.is_normalized("NFC", term.term)
        assert term.english is None or term.english == term.english.strip()
    with_english = sum(t.english is not None for t in catalog)
    assert with_english >= 0.9 * len(catalog)


@pytest.mark.parametrize(
    ("term", "category"),
    [
        ("기준금리", "통화정책"),
        ("양적완화", "통화정책"),
        ("환율", "금융시장"),
        ("국내총생산(GDP)", "거시경제"),
        ("경상수지", "무역"),
        ("스태그플레이션", "거시경제"),
        ("주가수익비율(PER)", "투자"),
        ("자기자본이익률(ROE)", "투자"),
        ("부가가치세", "세무"),
        ("재보험", "보험"),
        ("예대마진", "은행"),
        ("전세", "부동산"),
        ("주택담보대출비율(LTV)", "부동산"),
    ],
)
def test_well_known_terms_present(catalog: list[Term], term: str, category: str) -> None:
    found = find_term(catalog, term)
    assert found is not None and found.term == term and found.category == category


def test_english_with_comma_round_trips(catalog: list[Term]) -> None:
    cif = find_term(catalog, "CIF")
    assert cif is not None and cif.english == "Cost, insurance and freight"
    assert find_term(catalog, "기준금리") == Term("기준금리", "통화정책", "Base rate")


# --- load_terms validation -----------------------------------------------------------------------


def write_csv(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "terms.csv"
    path.write_text("term,category,english\n" + body, encoding="utf-8")
    return path


def test_load_custom_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path, '기준금리,통화정책,Base rate\n전세,부동산,\n환어음,무역,"Bill, of exchange"\n')
    assert load_terms(path) == [
        Term("기준금리", "통화정책", "Base rate"),
        Term("전세", "부동산", None),
        Term("환어음", "무역", "Bill, of exchange"),
    ]


def test_load_accepts_bom(tmp_path: Path) -> None:
    path = tmp_path / "terms.csv"
    path.write_text("\ufeffterm,category,english\n기준금리,통화정책,Base rate\n", encoding="utf-8")
    assert load_terms(path) == [Term("기준금리", "통화정책", "Base rate")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("기준금리,통화정책,\n기준 금리,통화정책,\n", "line 3"),  # spacing only
        ("기준금리,통화정책,\n환율,금융시장,\n기준금리(Base),통화정책,\n", "line 4"),  # parentheses only
        ("주가수익비율(PER),투자,\nPER,투자,\n", "line 3"),  # the abbreviation on its own
        ("기준금리,통화정책,\n재정·통화,재정,\n재정 통화,재정,\n", "line 4"),  # middle dot vs space
        ("기준금리,통화정책,\n환율,외환,\n", "line 3"),  # unknown category
        ("기준금리,통화정책,\n,통화정책,\n", "line 3"),  # empty term
        ("기준금리,기타,\n", "line 2"),  # 기타 is only for pinned extras
    ],
)
def test_load_rejects_bad_rows_with_line_number(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_terms(write_csv(tmp_path, body))


def test_load_rejects_empty_and_missing_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no terms"):
        load_terms(write_csv(tmp_path, ""))
    path = tmp_path / "bad.csv"
    path.write_text("term,english\n기준금리,Base rate\n", encoding="utf-8")
    with pytest.raises(ValueError, match="category"):
        load_terms(path)


# --- normalize_term_key --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("기준금리", "기준금리"),
        ("  기준 금리 ", "기준금리"),
        ("기준\u00a0금리\t", "기준금리"),  # no-break space, tab
        ("PER", "per"),
        ("주가수익비율 (PER)", "주가수익비율(per)"),
        ("재정·통화", "재정통화"),
        ("재정ㆍ통화", "재정통화"),  # Hangul compatibility middle dot (common in Korean text)
        ("재정・통화", "재정통화"),
        ("K-ICS", "kics"),
        ("K–ICS", "kics"),  # en dash
        ("K‐ICS", "kics"),  # Unicode hyphen
        ("K−ICS", "kics"),  # minus sign
        ("", ""),
    ],
)
def test_normalize_term_key(text: str, key: str) -> None:
    assert normalize_term_key(text) == key
    assert normalize_term_key(key) == key  # idempotent


def test_normalize_term_key_composes_decomposed_hangul() -> None:
    decomposed = unicodedata.normalize("NFD", "기준금리")
    assert decomposed != "기준금리"
    assert normalize_term_key(decomposed) == "기준금리"


def test_aliases_and_find_term(catalog: list[Term]) -> None:
    assert term_aliases("주가수익비율(PER)") == {"주가수익비율(per)", "주가수익비율", "per"}
    per = find_term(catalog, "주가수익비율(PER)")
    assert per is not None
    for query in ("per", " PER ", "주가수익비율", "주가수익비율 (PER)"):
        assert find_term(catalog, query) == per
    assert find_term(catalog, "존재하지않는용어") is None


def test_a_term_catalog_is_the_same_sequence_with_the_same_lookups(catalog: list[Term]) -> None:
    indexed = TermCatalog(catalog)
    assert len(indexed) == len(catalog) and list(indexed) == catalog and indexed[0] == catalog[0]
    assert list(indexed[:3]) == catalog[:3]
    for query in ("per", "주가수익비율", "기준금리", "CIF", "존재하지않는용어", ""):
        assert find_term(indexed, query) == find_term(catalog, query) == indexed.find(query)
    history = [term.term for term in catalog[:40]]
    for offset in range(5):
        day = START + timedelta(days=offset)
        assert choose_next_term(indexed, history, day) == choose_next_term(catalog, history, day)
    assert choose_next_term(indexed, [], START, pinned="per") == find_term(catalog, "PER")


# --- choose_next_term ----------------------------------------------------------------------------

SMALL = [
    Term("기준금리", "통화정책", "Base rate"),
    Term("환율", "금융시장", "Exchange rate"),
    Term("채권", "투자", "Bond"),
    Term("전세", "부동산", None),
    Term("재보험", "보험", "Reinsurance"),
    Term("부가가치세", "세무", "Value-added tax"),
    Term("예대마진", "은행", "Loan-deposit margin"),
]


@pytest.mark.parametrize("which", ["small", "real"])
def test_no_repeats_until_exhausted_then_new_cycle(catalog: list[Term], which: str) -> None:
    terms = SMALL if which == "small" else catalog
    n = len(terms)
    chosen = simulate(terms, n + 5)
    first_cycle = [t.key for t in chosen[:n]]
    assert len(set(first_cycle)) == n, "a term repeated before the list was exhausted"
    assert set(first_cycle) == {t.key for t in terms}
    second_cycle = [t.key for t in chosen[n:]]
    assert len(set(second_cycle)) == 5, "the new cycle repeats within itself"


def test_small_list_two_full_cycles_and_order_is_not_catalog_order() -> None:
    n = len(SMALL)
    chosen = simulate(SMALL, 3 * n)
    for cycle in range(3):
        assert {t.key for t in chosen[cycle * n : (cycle + 1) * n]} == {t.key for t in SMALL}
    assert [t.term for t in chosen[:n]] != [t.term for t in SMALL]
    assert [t.term for t in chosen[:n]] != sorted(t.term for t in SMALL)


def test_last_remaining_term_is_chosen() -> None:
    history = [t.term for t in SMALL[:-1]]
    for offset in range(10):
        assert choose_next_term(SMALL, history, START + timedelta(days=offset)) == SMALL[-1]


def test_deterministic_for_the_same_inputs(catalog: list[Term]) -> None:
    history = [t.term for t in catalog[:40]]
    day = date(2026, 2, 19)
    first = choose_next_term(catalog, history, day)
    assert choose_next_term(catalog, list(history), day) == first
    # Row order of the CSV does not matter, nor whether history holds terms or normalised keys.
    assert choose_next_term(list(reversed(catalog)), [normalize_term_key(h) for h in history], day) == first


def test_the_date_drives_the_choice(catalog: list[Term]) -> None:
    picks = {choose_next_term(catalog, [], START + timedelta(days=offset)).key for offset in range(30)}
    assert len(picks) > 20


def test_history_entries_outside_the_catalog_are_ignored() -> None:
    history = ["기준금리", "운영자가 고른 용어", "환율", "기준 금리"]  # the last is a pinned re-post
    for offset in range(len(SMALL) * 3):
        term = choose_next_term(SMALL, history, START + timedelta(days=offset))
        assert term.key not in {"기준금리", "환율"}
    # An unknown entry does not count towards the cycle: six of seven seen, the seventh is due.
    history = [t.term for t in SMALL[:6]] + ["운영자가 고른 용어"]
    assert choose_next_term(SMALL, history, START) == SMALL[6]


def test_pinned_repeat_does_not_end_the_cycle_early() -> None:
    # 6 distinct terms plus a pinned repeat: the cycle is not done, only the 7th term may come.
    history = [t.term for t in SMALL[:6]] + [SMALL[0].term]
    assert choose_next_term(SMALL, history, START) == SMALL[6]


def test_pinned_term_wins(catalog: list[Term]) -> None:
    history = [t.term for t in SMALL]
    assert choose_next_term(SMALL, history, START, pinned="환율") == SMALL[1]
    assert choose_next_term(SMALL, [], START, pinned=" 기준 금리 ") == SMALL[0]
    per = choose_next_term(catalog, [], START, pinned="per")
    assert per.term == "주가수익비율(PER)" and per.category == "투자"


def test_pinned_term_outside_the_catalog_is_posted_as_other() -> None:
    chosen = choose_next_term(SMALL, [], START, pinned="  밸류업 프로그램 ")
    assert chosen == Term("밸류업 프로그램", OTHER_CATEGORY, None)


def test_blank_pin_is_no_pin() -> None:
    assert choose_next_term(SMALL, [], START, pinned="  ") == choose_next_term(SMALL, [], START)


def test_empty_catalog_without_pin_raises() -> None:
    with pytest.raises(ValueError):
        choose_next_term([], [], START)
    assert choose_next_term([], [], START, pinned="환율").category == OTHER_CATEGORY
