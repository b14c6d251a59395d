r"""The original study's evaluation definitions, for a table comparable with its numbers.

The original repository (loveless2001/glyph_reasoning, ``eval/eval_glyph_emergence.py``,
``eval/eval_lora_glyph.py`` and ``eval/eval_structures.py``) scores a completion like this; the
definitions are copied exactly, the code is ours:

* **emergence**: any of 🜞 🜆 🜂 🜃 appears in the output (🝞 is not one of them);
* **valid** (no "structure violation"): all four of 🜞 🜆 🜂 🜃 appear, anywhere, in any order,
  any number of times;
* **difficulty bucket** from the question text alone:
  ``score = words + 5 × numbers + 10 × cues``, where words are the whitespace-separated tokens,
  numbers the runs of digits (``\d+``), and cues how many of *each, per, twice, remaining,
  total, difference, sum* occur in the lower-cased question as substrings (each counted once);
  easy below 60, medium below 120, hard from 120;
* **accuracy**: the last number (``-?\d+\.?\d*``) of the text after the last 🜃 (of the whole
  output when there is none), equal *as a string* to the gold answer.

docs/evaluation.md explains why this project's definitions are stricter.
"""

from __future__ import annotations

import re
from typing import Any

from glyph_core.glyphs import Glyph

GLYPHS: tuple[str, ...] = (Glyph.GUIDELINE, Glyph.PLAN, Glyph.STEP, Glyph.TAKEAWAY)
CUES: tuple[str, ...] = ("each", "per", "twice", "remaining", "total", "difference", "sum")
EASY_BELOW = 60
HARD_FROM = 120
_NUMBER = re.compile(r"-?\d+\.?\d*")


def difficulty_score(question: str) -> int:
    words = len(question.split())
    numbers = len(re.findall(r"\d+", question))
    cues = sum(cue in question.lower() for cue in CUES)
    return words + 5 * numbers + 10 * cues


def difficulty_bucket(question: str) -> str:
    score = difficulty_score(question)
    return "easy" if score < EASY_BELOW else "medium" if score < HARD_FROM else "hard"


def emerged(text: str) -> bool:
    return any(g in text for g in GLYPHS)


def valid(text: str) -> bool:
    return all(g in text for g in GLYPHS)


def answer(text: str) -> str | None:
    after = text.split(Glyph.TAKEAWAY)[-1]
    nums = _NUMBER.findall(after)
    return nums[-1] if nums else None


def score(text: str, question: str | None, gold: str) -> dict[str, Any]:
    """The original columns of one completion (``orig_*``); no bucket without a question."""
    return {
        "orig_bucket": difficulty_bucket(question) if question is not None else None,
        "orig_emerged": emerged(text),
        "orig_valid": valid(text),
        "orig_correct": answer(text) == gold,
    }
