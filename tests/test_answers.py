from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from glyph_core.answers import (
    extract_answer,
    gsm8k_gold,
    is_equivalent,
    math_gold,
    svamp_gold,
    to_number,
)
from glyph_core.glyphs import format_trace
from glyph_core.latex import boxed_contents, last_boxed


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "\\frac34"),
        ("3/4", "0.75"),
        ("1,000", "1000"),
        ("$18.00", "18"),
        ("\\$18", "18"),
        ("50%", "50"),
        ("10\\%", "10"),
        ("5 \\text{ cm}", "5"),
        ("12 \\text{ square units}", "12"),
        ("18.0", "18"),
        ("-3", "-3"),
        ("-\\frac{1}{3}", "-0.333333"),
        ("90^\\circ", "90"),
        ("x = 5", "5"),
        ("(C)", "\\text{(C)}"),
        ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("x^2 + 2x + 1", "(x+1)^2"),
    ],
)
def test_equivalent(pred: str, gold: str) -> None:
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("17", "18"),
        ("-3", "3"),
        ("0.33", "\\frac{1}{3}"),
        ("5x", "5"),
        ("2\\pi", "6.28"),
        ("1000", "100"),
        (None, "5"),
        ("", "5"),
        ("(B)", "\\text{(C)}"),
    ],
)
def test_not_equivalent(pred: str | None, gold: str) -> None:
    assert not is_equivalent(pred, gold)


def test_equivalence_works_off_the_main_thread() -> None:
    """math-verify's signal timeouts raise outside the main thread; we must not return False for that."""
    got: list[bool] = []
    t = threading.Thread(
        target=lambda: got.append(is_equivalent("\\frac{\\sqrt{12}}{4}", "\\frac{\\sqrt3}{2}"))
    )
    t.start()
    t.join()
    assert got == [True]


def test_to_number() -> None:
    assert to_number("1,234.5") == to_number("1234.5") == pytest.approx(1234.5)
    assert to_number("\\frac{-6}{4}") == to_number("-1.5")
    assert to_number("\\frac{\\sqrt{3}}{2}") is None  # not a plain number: math-verify decides
    assert to_number("-\\frac{3}{2}") == to_number("-1.5")
    assert to_number("x+1") is None


def test_boxed_nested_and_variants() -> None:
    text = "so $\\boxed{\\frac{a^{2}}{b_{1}}}$ and also \\fbox{ 7 }"
    assert boxed_contents(text) == ["\\frac{a^{2}}{b_{1}}", "7"]
    assert last_boxed("answer \\boxed 5$.") == "5"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("truncated \\boxed{\\frac{1}{2}") is None
    assert last_boxed("no box") is None


TRACE = format_trace("rule", "plan", ["step one gives 3", "step two gives 12"], "so 12", "\\boxed{12}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TRACE, "12"),
        (TRACE.replace("\\boxed{12}", "Final answer: $-7$."), "-7"),
        (TRACE.replace("\\boxed{12}", "The answer is 42."), "42"),
        ("We get \\boxed{3} then finally \\boxed{\\frac{1}{2}} done 99", "\\frac{1}{2}"),
        ("Thus, the answer is 1,234.\nCheck: 5", "1,234"),
        ("Answer: x = 7", "x = 7"),
        ("3 apples plus 4 gives 7 apples", "7"),
        ("-2.5 is what we have", "-2.5"),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_final_section_beats_boxes_elsewhere() -> None:
    text = TRACE.replace("step one gives 3", "step one gives \\boxed{3}").replace("\\boxed{12}", "12")
    assert extract_answer(text) == "12"


def test_gold_extractors() -> None:
    assert gsm8k_gold("a\nb <<2*3=6>>6\n#### 1,200") == "1200"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker 5")
    assert (
        math_gold("x is $\\boxed{\\frac{1}{2}}$, not \\boxed{3}... wait \\boxed{\\sqrt{x^{2}}}")
        == "\\sqrt{x^{2}}"
    )
    assert math_gold("so \\boxed 5.") == "5"
    assert math_gold("\\fbox{$8$}") == "$8$"
    with pytest.raises(ValueError):
        math_gold("empty \\boxed{}")
    assert svamp_gold(51.0) == "51"
    assert svamp_gold(0.5) == "0.5"
    assert svamp_gold(-3.0) == "-3"


def test_math500_gold_agrees_with_official_answer(data_dir: Path) -> None:
    text = (data_dir / "math" / "math500_test.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert len(rows) == 500
    disagree = []
    for r in rows:
        gold = math_gold(r["solution"])
        if not is_equivalent(gold, r["answer"]):
            disagree.append((r["unique_id"], gold, r["answer"]))
    for d in disagree:
        print("disagree:", *d)
    assert len(disagree) <= 5, disagree  # >= 99 % of 500


# -- what tuned models really write -----------------------------------------------------------
# Each input is written in the shape of an observed failure: a 7B model after glyph SFT, greedy.

G, P, S, T, F = "\U0001f71e", "\U0001f706", "\U0001f702", "\U0001f703", "\U0001f75e"
HEAD = (
    f"{G} Work out the total before dividing.\n{P} Count the eggs, subtract the used ones.\n"
    f"{S} 3 + 4 = 7 eggs eaten or baked.\n{S} 16 - 7 = 9 eggs left.\n{T} She sells 9 eggs.\n"
)
DISPLAY_AFTER_COLON = (
    "To find the probability we count the favourable outcomes: there are 3 of them among 4.\n\n"
    "Therefore, the final answer is:\n\\[\n\\dfrac{3}{4}\n\\]"
)


@pytest.mark.parametrize(
    ("text", "gold"),
    [
        (DISPLAY_AFTER_COLON, "\\frac{3}{4}"),
        ("So we get 12 cookies per tray.\n\nThe final answer is:\n$$\n12\n$$", "12"),
        (HEAD + f"{F} The final answer is:\n\\[\n\\frac{{3}}{{4}}\n\\]", "0.75"),
        (HEAD + f"{F}\n\\[ x = 9 \\]", "9"),
        ("The answer is: \\( 18 \\).", "18"),
    ],
)
def test_display_maths_after_the_final_answer_is(text: str, gold: str) -> None:
    pred = extract_answer(text)
    assert pred is not None and "\\[" not in pred and "$" not in pred
    assert is_equivalent(pred, gold)


CUT_MID_REASONING = (
    "Let the number of students be n. Since n leaves remainder 3 when divided by 7, we have "
    "n = 7k + 3. Checking k = 0, 1, 2 gives 3, 10, 17, and 17 mod 5 = 2, so we try the next "
    "index, k = 3, which gives 24 and 24 mod 5 = 4. Continuing with k = 4 we get 31 and 31 mod 5"
)


def test_truncated_completion_without_a_marker_has_no_answer() -> None:
    assert extract_answer(CUT_MID_REASONING) == "5"  # what the last-number fallback would pick
    assert extract_answer(CUT_MID_REASONING, truncated=True) is None
    # explicit markers still count when the output was cut later on
    boxed = "So the answer is \\boxed{31}. Let me double-check this by computing 31 mod 5 = 1 and"
    assert extract_answer(boxed, truncated=True) == "31"
    said = "The answer is 42.\nLet me verify: 6 times 7 is 4"
    assert extract_answer(said, truncated=True) == "42"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the last, cut run may be part of a longer number: "4" of "42"
        ("Work: 6 * 7. The answer is 4", None),
        (f"{F} 42\n{F} 42\n{F} 42\n{F} 4", "42"),
        ("The answer is 42. The answer is 42. The answer is 4", "42"),
        # a run that closes a group or a sentence is complete
        ("so the final answer is $\\boxed{42}$", "42"),
        ("Hence the answer is 42.", "42"),
        (HEAD + f"{F} 9", None),
        (HEAD + f"{F} 9\n\nThe reasoning above is comp", "9"),
    ],
)
def test_truncation_drops_a_possibly_cut_tail(text: str, expected: str | None) -> None:
    assert extract_answer(text, truncated=True) == expected


def test_variation_selector_after_a_glyph_is_not_in_the_answer() -> None:
    text = HEAD + f"{F}\ufe0f 9"
    assert extract_answer(text) == "9"
    assert extract_answer(HEAD + f"{F}\ufe0f \\boxed{{9}}\u200d") == "9"


@pytest.mark.parametrize(
    "final",
    [
        "\\boxed{\\frac{3}{",
        "The final answer is $\\boxed{\\dfrac{1}{2} + \\sqrt{",
        "\\[\n\\frac{3}{4} + ",
    ],
)
def test_final_section_cut_inside_its_maths_has_no_answer(final: str) -> None:
    text = HEAD + f"{F} {final}"
    assert extract_answer(text) is None
    assert extract_answer(text, truncated=True) is None
    # not the fragment, and not a number picked out of the fragment or the steps either
    assert extract_answer("Some steps 16 - 7 = 9.\n\\boxed{\\frac{3}{", truncated=True) is None


@pytest.mark.parametrize(
    ("final", "gold"),
    [
        ("Myrtle has 16 eggs.", "16"),
        ("Janet makes $18 every day at the farmers' market.", "18"),
        ("The total cost is $1,250.", "1250"),
        ("After 3 days, the tank holds 16 gallons, which is even.", "16"),
        ("The area of the triangle is $\\frac{3}{4}$ square units.", "0.75"),
        ("So x = 3 + 4 = 7 apples in all.", "7"),
        ("Final answer: 18 dollars", "18"),
        ("**Final Answer**\n16", "16"),
        ("### Final answer\n\\(\\dfrac{2}{3}\\)", "\\frac{2}{3}"),
        ("16 eggs\n\nHuman: Thanks! Now what about 20 eggs?", "16"),
        ("Therefore:\n\n$\\frac{3}{4}$ of the tank.", "0.75"),
    ],
)
def test_final_section_that_is_a_sentence_or_has_a_label(final: str, gold: str) -> None:
    pred = extract_answer(HEAD + f"{F} {final}")
    assert is_equivalent(pred, gold), pred


@pytest.mark.parametrize(
    ("text", "gold"),
    [
        (f"{F} \\boxed{{\\frac{{\\sqrt{{3}}}}{{2}}}}", "\\frac{\\sqrt3}{2}"),
        (f"{F} \\boxed{{\\left(3, \\frac{{\\pi}}{{2}}\\right)}}", "(3,\\frac{\\pi}{2})"),
        (f"{F} $\\dfrac{{7}}{{12}}$", "\\frac{7}{12}"),
        (f"{F} 1,000,000", "1000000"),
        (f"{F} \\$2{{,}}500", "2500"),
        (f"{F} 45^\\circ", "45"),
        (f"{F} 12 \\text{{ cm}}^2", "12"),
        ("**Final Answer:** $x = 5$", "5"),
        ("The answer is 42 because 6 times 7 is 42, and 7 is prime.", "42"),
        ("The answer is $18 and the tip was $20.", "18"),
    ],
)
def test_adversarial_shapes_still_score(text: str, gold: str) -> None:
    assert is_equivalent(extract_answer(text), gold)


def test_looping_output_takes_the_last_complete_final_section() -> None:
    loop = HEAD + "\n".join([f"{F} 9", f"{T} She sells 9 eggs.", f"{F} 9"] * 5) + f"\n{F} "
    assert extract_answer(loop) == "9"
    assert extract_answer(loop, truncated=True) == "9"


def test_multiline_maths_in_the_final_section_is_kept_whole() -> None:
    matrix = "$\\begin{pmatrix}\n 1 \\\\\n -2\n\\end{pmatrix}$"
    assert extract_answer(f"{F} {matrix}") == "\\begin{pmatrix}\n 1 \\\\\n -2\n\\end{pmatrix}"
    assert is_equivalent(extract_answer(f"{F} {matrix}"), "\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}")


def test_math_text_answers_are_kept_whole() -> None:
    assert extract_answer(f"{F} x = 5 or x = -2") == "x = 5 or x = -2"
    assert extract_answer(f"{F} \\text{{Evelyn}}") == "\\text{Evelyn}"
    assert extract_answer(f"{F} (-\\infty, 3] \\cup [5, \\infty)") == "(-\\infty, 3] \\cup [5, \\infty)"
    assert extract_answer(f"{F} There is no solution.") == "There is no solution"
    # environment names are LaTeX, not prose words: the matrix is one answer, not its last entry
    matrix = "\\begin{pmatrix} -1/2 \\\\ 5/2 \\\\ 1 \\end{pmatrix}"
    assert extract_answer(f"{F} {matrix}") == matrix
