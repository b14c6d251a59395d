r"""Brace-aware scanning of the LaTeX in model output: ``\boxed{}`` contents and maths spans.

Answer extraction (:mod:`glyph_core.answers`) and the trace validator (:mod:`glyph_core.glyphs`)
must agree on when an answer is *complete*: a 🝞 section cut off inside ``\boxed{…`` or inside
display maths has no answer, so it is neither scored nor a valid trace. Both read that from
here, which is why this sits below both modules.
"""

from __future__ import annotations

import re

_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Inline maths by pandoc's rule (no space inside either `$`, no digit after the closing one),
# so the currency in "$18 and $20" is not read as maths.
INLINE_MATH = re.compile(r"\$(?!\s)([^$\n]*?[^\s$\\])\$(?!\d)|\\\((.+?)\\\)", re.DOTALL)
DISPLAY_MATH = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]", re.DOTALL)
_DISPLAY_OPEN = re.compile(r"(?<!\\)\\\[")
_DISPLAY_CLOSE = re.compile(r"(?<!\\)\\\]")


def braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == '{'`` and the index after it;
    None when it never closes. Escaped braces (``\\{``, ``\\}``) do not count."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character, \{ and \} included
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def _boxes(text: str) -> list[str | None]:
    """Every box command in order: its content, or None when its brace group never closes."""
    out: list[str | None] = []
    for m in _BOX_CMD.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            got = braced(text, i)
            out.append(got[0].strip() if got is not None else None)
        elif i > m.end():  # "\boxed 5": runs to the next whitespace or `$`
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                out.append(tok.group(0).rstrip(".,"))
    return out


def boxed_contents(text: str) -> list[str]:
    """Every complete ``\\boxed{...}``/``\\fbox{...}`` content, in order, nested braces kept.

    Also accepts the brace-less form ``\\boxed 5`` (MATH has a few), which runs to the next
    whitespace or ``$``. An unbalanced (truncated) box is skipped.
    """
    return [b for b in _boxes(text) if b is not None]


def last_boxed(text: str) -> str | None:
    """The last complete box's content (gold solutions: an unclosed box there is a typo)."""
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else None


def last_box_open(text: str) -> bool:
    """Does the last box command never close? In model output that means it was cut off."""
    boxes = _boxes(text)
    return bool(boxes) and boxes[-1] is None


def open_math(text: str) -> bool:
    """Is ``text`` cut off inside its answer: an unclosed last box, ``\\[`` or ``$$``?"""
    if last_box_open(text):
        return True
    if len(_DISPLAY_OPEN.findall(text)) > len(_DISPLAY_CLOSE.findall(text)):
        return True
    return text.count("$$") % 2 == 1


def math_spans(text: str) -> list[tuple[int, int, str]]:
    """Display and inline maths spans as (start, end, content), in order, not overlapping."""
    spans: list[tuple[int, int, str]] = []
    taken: list[tuple[int, int]] = []
    for rx in (DISPLAY_MATH, INLINE_MATH):
        for m in rx.finditer(text):
            if any(a < m.end() and m.start() < b for a, b in taken):
                continue
            content = next(g for g in m.groups() if g is not None)
            spans.append((m.start(), m.end(), content.strip()))
            taken.append((m.start(), m.end()))
    return sorted(spans)
