"""The glyph protocol (README.md, "The glyph protocol and the prompts"): parse a completion into sections and name every violation.

A trace is valid when Guideline, Plan, Takeaway and Final answer appear exactly once, Step at
least once, in the order 🜞 < 🜆 < 🜂… < 🜃 < 🝞, with no empty section and a final answer
that is not blank and not cut off inside its maths (an unclosed ``\\boxed{`` or ``\\[``).
Validation returns *all* violations by name rather than a bool, because the filter stage counts
them and a person debugging a teacher needs to know what went wrong.

Models write invisible characters after a glyph: a variation selector (U+FE0F asks for the
emoji presentation) or a zero-width joiner. They belong to the glyph, not to its section;
otherwise "🜞\\uFE0F" followed by the next glyph would hide an empty section from the
validator and leak into the extracted answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from glyph_core.latex import open_math


class Glyph(StrEnum):
    GUIDELINE = "\U0001f71e"  # 🜞
    PLAN = "\U0001f706"  # 🜆
    STEP = "\U0001f702"  # 🜂
    TAKEAWAY = "\U0001f703"  # 🜃
    FINAL = "\U0001f75e"  # 🝞


GLYPH_NAMES: dict[Glyph, str] = {
    Glyph.GUIDELINE: "Guideline",
    Glyph.PLAN: "Plan",
    Glyph.STEP: "Step",
    Glyph.TAKEAWAY: "Takeaway",
    Glyph.FINAL: "Final answer",
}
ORDER: tuple[Glyph, ...] = (Glyph.GUIDELINE, Glyph.PLAN, Glyph.STEP, Glyph.TAKEAWAY, Glyph.FINAL)
_RANK = {g: i for i, g in enumerate(ORDER)}
# Variation selectors, zero-width (non-)joiners/space, word joiner, byte-order mark.
INVISIBLE = "\ufe00-\ufe0f\u200b-\u200d\u2060\ufeff"
_EDGES = re.compile(f"^[\\s{INVISIBLE}]+|[\\s{INVISIBLE}]+$")
_SPLIT = re.compile("(" + "|".join(re.escape(g.value) for g in ORDER) + f")[{INVISIBLE}]*")
# A teacher often writes "🜂 Step 1:" or "🝞 Final answer:", a tuned model also
# "🝞 **Final Answer**" or "🝞 ### Final answer" on a line of its own above the content; the
# label is not content.
_LABEL = re.compile(
    r"^\s*(?:#+\s*)?(?:\*\*)?\s*(?:guideline|plan|step(?:\s*\d+)?|takeaway|final\s+answer|answer)"
    r"\s*(?:\*\*)?\s*(?:[:\-–]|(?=\n\s*\S))\s*(?:\*\*)?",
    re.IGNORECASE,
)


class Violation(StrEnum):
    MISSING_GLYPH = "missing_glyph"
    DUPLICATE_GLYPH = "duplicate_glyph"
    WRONG_ORDER = "wrong_order"
    EMPTY_SECTION = "empty_section"
    NO_FINAL_ANSWER = "no_final_answer"


@dataclass(frozen=True)
class Section:
    glyph: Glyph
    text: str


@dataclass(frozen=True)
class Trace:
    """A completion split at glyphs; `preamble` is whatever came before the first glyph."""

    preamble: str
    sections: tuple[Section, ...] = field(default_factory=tuple)

    def texts(self, glyph: Glyph) -> list[str]:
        return [s.text for s in self.sections if s.glyph is glyph]

    @property
    def final_answer(self) -> str | None:
        finals = self.texts(Glyph.FINAL)
        return finals[-1] if finals and finals[-1] else None

    @property
    def glyphs_used(self) -> set[Glyph]:
        return {s.glyph for s in self.sections}


def _strip_label(text: str) -> str:
    return _EDGES.sub("", _LABEL.sub("", _EDGES.sub("", text), count=1))


def parse_trace(text: str) -> Trace:
    parts = _SPLIT.split(text)
    sections = tuple(
        Section(Glyph(parts[i]), _strip_label(parts[i + 1])) for i in range(1, len(parts) - 1, 2)
    )
    return Trace(preamble=parts[0].strip(), sections=sections)


def has_any_glyph(text: str) -> bool:
    return _SPLIT.search(text) is not None


def validate_trace(text: str | Trace) -> list[Violation]:
    """All violations of the protocol above, each named once; an empty list means valid."""
    trace = parse_trace(text) if isinstance(text, str) else text
    found: list[Violation] = []

    def add(v: Violation) -> None:
        if v not in found:
            found.append(v)

    counts = {g: 0 for g in ORDER}
    for s in trace.sections:
        counts[s.glyph] += 1
    for g in ORDER:
        if counts[g] == 0:
            add(Violation.MISSING_GLYPH)
        elif counts[g] > 1 and g is not Glyph.STEP:
            add(Violation.DUPLICATE_GLYPH)
    ranks = [_RANK[s.glyph] for s in trace.sections]
    if any(b < a for a, b in zip(ranks, ranks[1:], strict=False)):
        add(Violation.WRONG_ORDER)
    if any(not s.text for s in trace.sections if s.glyph is not Glyph.FINAL):
        add(Violation.EMPTY_SECTION)
    final = trace.final_answer
    if counts[Glyph.FINAL] and (not final or open_math(final)):
        add(Violation.NO_FINAL_ANSWER)
    return found


def is_valid_trace(text: str) -> bool:
    return not validate_trace(text)


def format_trace(guideline: str, plan: str, steps: list[str], takeaway: str, final: str) -> str:
    """The canonical rendering the reference teacher writes and the student learns."""
    lines = [f"{Glyph.GUIDELINE} {guideline.strip()}", f"{Glyph.PLAN} {plan.strip()}"]
    lines += [f"{Glyph.STEP} {s.strip()}" for s in steps]
    lines += [f"{Glyph.TAKEAWAY} {takeaway.strip()}", f"{Glyph.FINAL} {final.strip()}"]
    return "\n".join(lines)
