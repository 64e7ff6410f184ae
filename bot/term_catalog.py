"""The curated catalog behind 오늘의 금융용어 (term of the day) and the choice of the next term.

Everything here is pure: no clock, no database, no Slack. The scheduler passes in today's date and the
terms already posted in a channel, so the same inputs always give the same term (retries, restarts and
`--dry-run` agree with what is eventually posted).
"""

from __future__ import annotations

import csv
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path
from typing import TextIO, overload

CATEGORIES: tuple[str, ...] = (
    "통화정책",
    "금융시장",
    "회계",
    "무역",
    "거시경제",
    "재정",
    "투자",
    "보험",
    "세무",
    "은행",
    "부동산",
    "경영",
)
# Operators may pin any term, even one the catalog lacks; it still needs a category for the post.
OTHER_CATEGORY = "기타"

_PACKAGE = "bot.data"
_FILENAME = "terms.csv"
_COLUMNS = ("term", "category", "english")

# Middle dots (·, ・, ㆍ, ‧, ･, ∙, •) and hyphen/dash variants (-, ‐, ‑, ‒, –, —, ―, −, ﹣, －):
# people type "재정·통화", "재정ㆍ통화" or "재정 통화" for the same thing, and Slack/IME input varies.
_IGNORED_CHARS = re.compile(
    r"[\s\u00b7\u30fb\u318d\u2027\uff65\u2219\u2022\u002d\u2010-\u2015\u2212\ufe63\uff0d]+"
)
_PARENTHESISED = re.compile(r"\(([^()]*)\)")


@dataclass(frozen=True)
class Term:
    term: str
    category: str
    english: str | None

    @property
    def key(self) -> str:
        return normalize_term_key(self.term)


def normalize_term_key(text: str) -> str:
    """The identity of a term: NFC, stripped, lowercased, without spaces, middle dots or hyphens.

    NFC matters because macOS and some IMEs send decomposed Hangul (NFD) that looks identical but
    compares unequal. The result is idempotent, so already-normalised keys can be passed back in.
    """
    return _IGNORED_CHARS.sub("", unicodedata.normalize("NFC", text).strip().lower())


def term_aliases(term: str) -> frozenset[str]:
    """Keys a term can be found by: the whole term, the term without its parenthesised part, and that part.

    "주가수익비율(PER)" is therefore found by "주가수익비율 (PER)", "주가수익비율" and "per". The catalog
    rejects two terms sharing any alias, which is how near-duplicates ("X" next to "X(약어)") are caught.
    """
    normalized = unicodedata.normalize("NFC", term)
    keys = {normalize_term_key(normalized), normalize_term_key(_PARENTHESISED.sub("", normalized))}
    keys.update(normalize_term_key(inner) for inner in _PARENTHESISED.findall(normalized))
    keys.discard("")
    return frozenset(keys)


def load_terms(path: Path | None = None) -> list[Term]:
    """Read and validate the catalog; the default is the CSV shipped in the `bot.data` package.

    Raises ValueError naming the line for an empty term, an unknown category, a duplicate (by alias,
    see `term_aliases`), a missing column, or an empty file.
    """
    if path is None:
        with resources.files(_PACKAGE).joinpath(_FILENAME).open("r", encoding="utf-8-sig", newline="") as f:
            return _parse_terms(f, source=_FILENAME)
    # utf-8-sig: a spreadsheet round trip often adds a BOM, which would otherwise corrupt the header.
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        return _parse_terms(f, source=str(path))


def _parse_terms(f: TextIO, source: str) -> list[Term]:
    reader = csv.DictReader(f)
    missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{source} line 1: missing column(s) {', '.join(missing)}")
    terms: list[Term] = []
    alias_lines: dict[str, tuple[int, str]] = {}
    for row in reader:
        line = reader.line_num
        text = unicodedata.normalize("NFC", (row.get("term") or "").strip())
        category = unicodedata.normalize("NFC", (row.get("category") or "").strip())
        english = (row.get("english") or "").strip() or None
        if not text:
            raise ValueError(f"{source} line {line}: empty term")
        if category not in CATEGORIES:
            raise ValueError(f"{source} line {line}: unknown category {category!r} for {text!r}")
        for alias in sorted(term_aliases(text)):
            if alias in alias_lines:
                other_line, other = alias_lines[alias]
                raise ValueError(
                    f"{source} line {line}: {text!r} duplicates {other!r} from line {other_line} (key {alias!r})"
                )
            alias_lines[alias] = (line, text)
        terms.append(Term(term=text, category=category, english=english))
    if not terms:
        raise ValueError(f"{source}: no terms")
    return terms


def _alias_index(terms: Iterable[Term]) -> dict[str, Term]:
    index: dict[str, Term] = {}
    for term in terms:
        for alias in term_aliases(term.term):
            # First one wins so a hand-built list with overlaps still behaves predictably.
            index.setdefault(alias, term)
    # Exact keys must beat an alias of another term, e.g. a catalog holding both "PER" and "X(PER)".
    for term in terms:
        index[term.key] = term
    return index


class TermCatalog(Sequence[Term]):
    """An immutable sequence of terms whose alias index is built once.

    Building the index costs about a millisecond for the shipped catalog; a long-lived service
    holds one of these so that each `/용어` lookup and each post pays only a dict lookup.
    """

    __slots__ = ("_index", "_terms")

    def __init__(self, terms: Iterable[Term]) -> None:
        self._terms = tuple(terms)
        self._index = _alias_index(self._terms)

    @overload
    def __getitem__(self, position: int) -> Term: ...

    @overload
    def __getitem__(self, position: slice) -> tuple[Term, ...]: ...

    def __getitem__(self, position: int | slice) -> Term | tuple[Term, ...]:
        return self._terms[position]

    def __len__(self) -> int:
        return len(self._terms)

    def __repr__(self) -> str:
        return f"TermCatalog({len(self._terms)} terms)"

    def find(self, text: str) -> Term | None:
        """The term that `text` names (by any alias), or None."""
        return self._index.get(normalize_term_key(text))


def as_catalog(terms: Sequence[Term]) -> TermCatalog:
    """`terms` itself when it already is a catalog (no index rebuilt), else a new one."""
    return terms if isinstance(terms, TermCatalog) else TermCatalog(terms)


def find_term(terms: Sequence[Term], text: str) -> Term | None:
    """The catalog term that `text` names (by any alias), or None.

    Given a `TermCatalog` this is a dict lookup; a plain list is indexed on every call.
    """
    return as_catalog(terms).find(text)


def choose_next_term(
    terms: Sequence[Term],
    already_posted: Sequence[str],
    day: date,
    pinned: str | None = None,
) -> Term:
    """The term to post in one channel on `day`.

    - `pinned` (an operator's choice for that date) always wins. It is matched against the catalog by
      alias; a term the catalog lacks is still posted, with category "기타", because the operator
      asked for it explicitly.
    - Otherwise, a catalog term not yet posted in the channel's current cycle. `already_posted` is
      the channel's history in posting order (terms or normalised keys). A cycle ends once every
      catalog term has appeared; the terms after that point make up the current cycle, so nothing
      repeats until the whole list is used. History entries the catalog doesn't know (pinned extras,
      removed terms) are ignored, and a pinned re-post of a term doesn't restart anything.
    - Among the remaining terms the pick is a hash of the date and the cycle number: reproducible for
      the same inputs (a retried or restarted job picks the same term), but not alphabetical.
    """
    catalog = as_catalog(terms)
    if pinned is not None and normalize_term_key(pinned):
        found = catalog.find(pinned)
        if found is not None:
            return found
        return Term(term=unicodedata.normalize("NFC", pinned).strip(), category=OTHER_CATEGORY, english=None)
    if not catalog:
        raise ValueError("choose_next_term: the term catalog is empty")

    by_key: dict[str, Term] = {}
    for term in catalog:
        by_key.setdefault(term.key, term)

    cycle = 0
    posted_in_cycle: set[str] = set()
    for entry in already_posted:
        match = catalog.find(entry)
        if match is None:
            continue
        posted_in_cycle.add(match.key)
        if len(posted_in_cycle) >= len(by_key):
            cycle += 1
            posted_in_cycle.clear()

    # Sorted by key so the pick depends on the catalog's content, not on the CSV's row order.
    remaining = sorted(key for key in by_key if key not in posted_in_cycle)
    digest = hashlib.sha256(f"{day.isoformat()}|cycle {cycle}".encode()).digest()
    return by_key[remaining[int.from_bytes(digest[:8], "big") % len(remaining)]]
