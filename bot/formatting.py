"""Turn model output (Markdown-ish text) into safe, readable Slack mrkdwn.

Safety comes first: Slack treats ``&``, ``<`` and ``>`` as control characters, so escaping them
makes ``<!channel>``, ``<!here>``, ``<@U123>``, ``<#C123>`` and ``<http://x|label>`` links
impossible in anything the model writes. Control characters and bidi overrides are dropped
(`llm.cleaning.strip_control_characters`), so nothing the model writes can garble the message
or make it display in another order than it reads. Bare ``@channel``/``@here``/``@everyone`` (and user
group handles) would still notify people if a message were ever posted with ``link_names`` or
``parse=full``, so a WORD JOINER (U+2060, invisible) goes after every ``@`` that starts a word.

Readability second: Markdown the model likes to write (``**bold**``, ``# headings``, ``- lists``,
``[text](url)``, ``~~strike~~``) is rewritten into mrkdwn. Code spans and fenced blocks are
left alone apart from the escaping, so nothing inside code is reformatted.
"""

from __future__ import annotations

import re

from llm.cleaning import strip_control_characters

__all__ = ["to_mrkdwn"]

_WORD_JOINER = "\u2060"
# Slack only renders *bold* when the markers sit at word edges; Korean particles glue onto the
# word before them ("**금리**는"), so a zero-width space marks the edge without showing.
_ZERO_WIDTH_SPACE = "\u200b"
# Private-use characters stand in for code spans and bold markers while the prose is rewritten;
# any already in the model's text are dropped first so they cannot collide.
_RULE = "\u2500" * 10
_CODE_OPEN, _CODE_CLOSE, _BOLD = "\ue000", "\ue001", "\ue002"
_SENTINELS_RE = re.compile("[\ue000-\ue002]")

_FENCE_RE = re.compile(r"^([ \t]*)```([^\n`]*)\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
_OPEN_FENCE_RE = re.compile(r"^([ \t]*)```([^\n`]*)(?:\n(.*))?\Z", re.MULTILINE | re.DOTALL)
_INLINE_CODE_RE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_PLACEHOLDER_RE = re.compile(f"{_CODE_OPEN}(\\d+){_CODE_CLOSE}")

_MENTION_RE = re.compile(r"(?<![\w@])@(?=\w)")
_RULE_RE = re.compile(r"^[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*$", re.MULTILINE)
_HEADING_RE = re.compile(r"^[ \t]*#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
_BULLET_RE = re.compile(r"^([ \t]*)[-*+][ \t]+(?=\S)", re.MULTILINE)
_IMAGE_OR_LINK_RE = re.compile(
    r"!?\[([^\]\n]+)\]\(([^()\s]+(?:\([^()\s]*\)[^()\s]*)*)(?:[ \t]+\"[^\"\n]*\")?\)"
)
_BOLD_ITALIC_RE = re.compile(r"\*\*\*(?=\S)(.+?)(?<=\S)\*\*\*")
_BOLD_STARS_RE = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_BOLD_UNDERSCORES_RE = re.compile(r"(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)")
_ITALIC_STAR_RE = re.compile(r"(?<![\w*])\*(?=[^\s*])([^*\n]+?)(?<=[^\s*])\*(?![\w*])")
_STRIKE_RE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")


def _escape(text: str) -> str:
    # & first, so the entities produced for < and > are not escaped a second time.
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MENTION_RE.sub("@" + _WORD_JOINER, text)


def _link(match: re.Match[str]) -> str:
    label, url = match.group(1).strip(), match.group(2)
    return url if label == url else f"{label} ({url})"


def _bold(match: re.Match[str]) -> str:
    inner = match.group(1).replace(_BOLD, "")
    return f"{_BOLD}{inner}{_BOLD}"


def _heading(match: re.Match[str]) -> str:
    # Headings become bold lines; bold inside them would otherwise nest into "**".
    title = match.group(1).replace(_BOLD, "").strip("*").strip()
    return f"{_BOLD}{title}{_BOLD}" if title else match.group(0)


def _mark_word_edges(text: str, marker: str) -> str:
    """Put a zero-width space where `marker` pairs touch letters, so Slack still renders them."""
    pattern = re.compile(f"{re.escape(marker)}([^\n]+?){re.escape(marker)}")

    def wrap(match: re.Match[str]) -> str:
        before = text[match.start() - 1] if match.start() > 0 else ""
        after = text[match.end()] if match.end() < len(text) else ""
        prefix = _ZERO_WIDTH_SPACE if before.isalnum() else ""
        suffix = _ZERO_WIDTH_SPACE if after.isalnum() else ""
        return f"{prefix}*{match.group(1)}*{suffix}"

    return pattern.sub(wrap, text)


def _convert_prose(text: str) -> str:
    text = _escape(text)
    text = _IMAGE_OR_LINK_RE.sub(_link, text)
    # A rule ("---", "* * *") would otherwise be mistaken for a bullet or for emphasis.
    text = _RULE_RE.sub(_RULE, text)
    text = _BOLD_ITALIC_RE.sub(lambda m: f"{_BOLD}_{m.group(1)}_{_BOLD}", text)
    text = _BOLD_STARS_RE.sub(_bold, text)
    text = _BOLD_UNDERSCORES_RE.sub(_bold, text)
    text = _HEADING_RE.sub(_heading, text)
    # Bullets before italics: "* item" must not be read as the start of an *italic* span.
    text = _BULLET_RE.sub(lambda m: f"{m.group(1)}• ", text)
    text = _ITALIC_STAR_RE.sub(r"_\1_", text)
    text = _STRIKE_RE.sub(r"~\1~", text)
    return _mark_word_edges(text, _BOLD)


def to_mrkdwn(text: str) -> str:
    """Return `text` (model output, Markdown-ish) as Slack mrkdwn that cannot mention or link.

    - ``&``, ``<``, ``>`` become ``&amp;``, ``&lt;``, ``&gt;`` everywhere, code included;
      ``@`` at the start of a word gets an invisible word joiner so it cannot notify anyone;
      control characters and bidi overrides are removed, line ends become ``\n``.
    - ``**b**``/``__b__`` become ``*b*``; ``*i*`` becomes ``_i_``; ``~~s~~`` becomes ``~s~``.
    - ``#``-headings become bold lines; ``-``/``*``/``+`` bullets become ``•`` (indentation kept);
      numbered lists are left as they are.
    - ``[label](url)`` and images become ``label (url)``: Slack links need ``<``, which is escaped.
    - Fenced code blocks and inline code keep their content; a fence's language tag is dropped
      (mrkdwn would show it as the first code line) and a fence left open by a cut-off answer
      is closed.
    """
    text = _SENTINELS_RE.sub("", strip_control_characters(text))
    code: list[str] = []

    def stash(rendered: str) -> str:
        code.append(rendered)
        return f"{_CODE_OPEN}{len(code) - 1}{_CODE_CLOSE}"

    def fenced(match: re.Match[str]) -> str:
        indent, body = match.group(1), match.group(3) or ""
        body = body.rstrip("\n")
        inside = f"{_escape(body)}\n" if body else ""
        return stash(f"{indent}```\n{inside}{indent}```")

    text = _FENCE_RE.sub(fenced, text)
    text = _OPEN_FENCE_RE.sub(fenced, text)
    text = _INLINE_CODE_RE.sub(lambda m: stash(f"{m.group(1)}{_escape(m.group(2))}{m.group(1)}"), text)
    text = _convert_prose(text)
    return _PLACEHOLDER_RE.sub(lambda m: code[int(m.group(1))], text)


def escape_for_stream(text: str) -> str:
    """The escaping of `to_mrkdwn` alone, for showing text while it is generated.

    Appending is only safe if the escaped form of a prefix is a prefix of the escaped whole; that
    holds except for a trailing ``@`` (whether it gets a word joiner depends on the next
    character), so a trailing ``@`` is held back until more text arrives. Control characters go
    as in `to_mrkdwn` (character by character, so that keeps prefixes too).
    """
    text = _SENTINELS_RE.sub("", strip_control_characters(text))
    if text.endswith("@"):
        text = text[:-1]
    return _escape(text)


_PARAGRAPH_RE = re.compile(r"\n\s*\n")
_LINE_RE = re.compile(r"\n")
_SENTENCE_RE = re.compile(r"(?<=[.!?。])\s+|(?<=[다요죠까])\.\s*")
_SPACE_RE = re.compile(r"\s+")


def split_message(text: str, limit: int) -> list[str]:
    """Split `text` into pieces of at most `limit` characters for separate Slack messages.

    Cuts at the last paragraph break that fits, else a line break, else a sentence end, else a
    space, and only as a last resort in the middle of a word. Pieces are stripped; none is empty.
    """
    if limit <= 0:
        raise ValueError("limit must be positive")
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[: limit + 1]
        cut = None
        for pattern in (_PARAGRAPH_RE, _LINE_RE, _SENTENCE_RE, _SPACE_RE):
            ends = [m for m in pattern.finditer(window) if 0 < m.start() <= limit and m.start() >= limit // 3]
            if ends:
                match = ends[-1]
                # Keep a sentence's final period with the sentence.
                cut = match.start() if pattern is not _SENTENCE_RE else max(match.start(), 1)
                if pattern is _SENTENCE_RE and window[match.start() : match.start() + 1] == ".":
                    cut = match.start() + 1
                break
        if cut is None:
            cut = limit
        piece = rest[:cut].strip()
        if piece:
            pieces.append(piece)
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return pieces
