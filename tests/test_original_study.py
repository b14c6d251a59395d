"""The original study's definitions, copied exactly (glyph_core/original_study.py), next to ours on
the shapes where they differ."""

from __future__ import annotations

import pytest

from glyph_core import original_study as orig
from glyph_core.answers import extract_answer, is_equivalent
from glyph_core.glyphs import Violation, validate_trace

G, P, S, T, F = "\U0001f71e", "\U0001f706", "\U0001f702", "\U0001f703", "\U0001f75e"


def test_difficulty_heuristic_by_hand():
    q = "Tom has 3 apples and buys 4 more each day. How many in total?"
    # 14 words + 5 x 2 numbers + 10 x 2 cues ("each", "total") = 44
    assert orig.difficulty_score(q) == 44 and orig.difficulty_bucket(q) == "easy"
    # cues are substrings, as in the original: "percent" contains "per", "summer" contains "sum"
    assert orig.difficulty_score("percent summer") == 2 + 10 + 10
    long_q = " ".join(["word"] * 70) + " 1 2 3 4 5 6 7 8 9 10"
    assert orig.difficulty_score(long_q) == 80 + 50 and orig.difficulty_bucket(long_q) == "hard"
    assert orig.difficulty_bucket(" ".join(["w"] * 60)) == "medium"  # 60 is not below 60
    assert orig.difficulty_bucket(" ".join(["w"] * 59)) == "easy"


def test_emergence_ignores_the_final_glyph():
    assert not orig.emerged(f"The total is 5.\n{F} 5")
    assert orig.emerged(f"{S} 2 + 3 = 5")


def test_a_looping_output_is_valid_the_original_way_but_not_ours():
    loop = f"{G} add\n{P} sum\n{S} 2 + 3 = 5\n{T} 5\n" + "\n".join(f"{F} 5\n{T} so 5" for _ in range(4))
    assert orig.valid(loop)
    assert Violation.DUPLICATE_GLYPH in validate_trace(loop)
    out_of_order = f"{T} 5\n{S} 2 + 3\n{P} sum\n{G} add"  # no 🝞 at all
    assert orig.valid(out_of_order) and validate_trace(out_of_order)


@pytest.mark.parametrize(
    ("text", "gold", "orig_correct", "ours_correct"),
    [
        (f"{T} The sum is 5.\n{F} 5", "5", True, True),
        (f"{T} It costs $18.00.\n{F} $18.00", "18", False, True),  # "18.00" != "18" as strings
        (f"{T} Half of it.\n{F} \\frac{{1}}{{2}}", "\\frac{1}{2}", False, True),  # last number "2"
        (f"{T} 1,000 in all\n{F} 1,000", "1000", False, True),
        (f"{S} 7 - 2 = 5\n{T} so the answer is 5, checked with 3 cases", "5", False, True),
    ],
)
def test_accuracy_is_last_number_as_a_string(text, gold, orig_correct, ours_correct):
    assert orig.score(text, "q", gold)["orig_correct"] is orig_correct
    assert is_equivalent(extract_answer(text), gold) is ours_correct


def test_score_columns():
    s = orig.score(f"{G} a\n{P} b\n{S} c\n{T} 5", "What is 2 + 3?", "5")
    assert s == {"orig_bucket": "easy", "orig_emerged": True, "orig_valid": True, "orig_correct": True}
    assert orig.score("5", None, "5")["orig_bucket"] is None
