"""The glyph protocol (README.md, "The glyph protocol and the prompts"): every violation is named, valid traces round-trip."""

import pytest

from glyph_core.glyphs import (
    Glyph,
    Violation,
    format_trace,
    has_any_glyph,
    is_valid_trace,
    parse_trace,
    validate_trace,
)
from glyph_core.prompts import GLYPH_SYSTEM, TEMPLATE_HASH, latent_messages, messages_for, natural_messages

G, P, S, T, F = (g.value for g in Glyph)
VALID = f"{G} Keep units straight.\n{P} Add, then multiply.\n{S} 2+3=5\n{S} 5*4=20\n{T} So 20.\n{F} 20"


def test_code_points_are_the_protocol():
    assert [hex(ord(g.value)) for g in Glyph] == ["0x1f71e", "0x1f706", "0x1f702", "0x1f703", "0x1f75e"]


def test_valid_trace_parses_into_sections():
    trace = parse_trace("Let me think.\n" + VALID)
    assert trace.preamble == "Let me think."
    assert [s.glyph for s in trace.sections] == [
        Glyph.GUIDELINE,
        Glyph.PLAN,
        Glyph.STEP,
        Glyph.STEP,
        Glyph.TAKEAWAY,
        Glyph.FINAL,
    ]
    assert trace.texts(Glyph.STEP) == ["2+3=5", "5*4=20"]
    assert trace.final_answer == "20"
    assert validate_trace(VALID) == []
    assert is_valid_trace(VALID)


def test_labels_after_glyphs_are_not_content():
    text = f"{G} Guideline: rule\n{P} **Plan:** plan\n{S} Step 1: a\n{T} Takeaway - done\n{F} Final answer: 7"
    trace = parse_trace(text)
    assert trace.final_answer == "7"
    assert trace.texts(Glyph.STEP) == ["a"]
    assert validate_trace(text) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VALID.replace(f"{G} Keep units straight.\n", ""), [Violation.MISSING_GLYPH]),
        (VALID.replace(f"{S} 2+3=5\n{S} 5*4=20\n", ""), [Violation.MISSING_GLYPH]),
        (VALID + f"\n{F} 21", [Violation.DUPLICATE_GLYPH]),
        (f"{P} plan\n{G} rule\n{S} a\n{T} t\n{F} 1", [Violation.WRONG_ORDER]),
        (f"{G} rule\n{P} plan\n{S} a\n{F} 1\n{T} t", [Violation.WRONG_ORDER]),
        (f"{G}\n{P} plan\n{S} a\n{T} t\n{F} 1", [Violation.EMPTY_SECTION]),
        (f"{G} rule\n{P} plan\n{S} a\n{T} t\n{F}   ", [Violation.NO_FINAL_ANSWER]),
        (f"{G} rule\n{P} plan\n{S} a\n{T} t\n{F} Final answer:", [Violation.NO_FINAL_ANSWER]),
        ("The answer is 20.", [Violation.MISSING_GLYPH]),
    ],
)
def test_each_violation_is_named(text, expected):
    assert validate_trace(text) == expected


def test_several_violations_at_once():
    text = f"{P} plan\n{G}\n{G} again\n{T} t"
    found = set(validate_trace(text))
    assert found == {
        Violation.MISSING_GLYPH,
        Violation.DUPLICATE_GLYPH,
        Violation.WRONG_ORDER,
        Violation.EMPTY_SECTION,
    }


def test_format_trace_is_valid_and_round_trips():
    text = format_trace("rule", "plan", ["a", "b", "c"], "so", "42")
    assert validate_trace(text) == []
    assert parse_trace(text).texts(Glyph.STEP) == ["a", "b", "c"]
    assert parse_trace(text).final_answer == "42"


def test_partial_use_counts_as_glyphs():
    assert has_any_glyph(f"some text {S} one step")
    assert not has_any_glyph("plain answer 12")


def test_latent_and_natural_prompts_never_mention_glyphs():
    question = "Tom has 3 apples and buys 4 more. How many?"
    for messages in (latent_messages(question), natural_messages(question)):
        text = " ".join(m["content"] for m in messages).lower()
        assert not has_any_glyph(text)
        for word in ("glyph", "symbol", "tag", "structure", "guideline", "takeaway"):
            assert word not in text, word
        assert question in text or question.lower() in text
    glyph = " ".join(m["content"] for m in messages_for("glyph", question))
    assert all(g.value in glyph for g in Glyph) and GLYPH_SYSTEM in glyph
    with pytest.raises(ValueError, match="unknown prompt kind"):
        messages_for("socratic", question)
    assert len(TEMPLATE_HASH) == 16


# -- what tuned models really write -----------------------------------------------------------


@pytest.mark.parametrize("invisible", ["\ufe0f", "\ufe0e", "\u200d", "\ufe0f\u200b"])
def test_invisible_characters_after_a_glyph_belong_to_the_glyph(invisible):
    hidden_empty = (
        f"{G}{invisible}\n{P}{invisible} Add, then multiply.\n{S} 2+3=5\n{T} So 5.\n{F}{invisible} 5"
    )
    assert validate_trace(hidden_empty) == [Violation.EMPTY_SECTION]
    trace = parse_trace(hidden_empty)
    assert trace.final_answer == "5" and trace.texts(Glyph.PLAN) == ["Add, then multiply."]
    fine = VALID.replace(G, G + invisible).replace(F, F + invisible)
    assert validate_trace(fine) == [] and parse_trace(fine).final_answer == "20"


@pytest.mark.parametrize(
    "final",
    ["\\boxed{\\frac{3}{", "The final answer is $\\boxed{2\\sqrt{", "\\[\n\\frac{3}{4} +", "$$ 12 +"],
)
def test_final_section_cut_inside_its_maths_is_not_a_valid_trace(final):
    text = VALID.replace(f"{F} 20", f"{F} {final}")
    assert validate_trace(text) == [Violation.NO_FINAL_ANSWER]
    closed = VALID.replace(f"{F} 20", f"{F} \\boxed{{\\frac{{3}}{{4}}}}")
    assert validate_trace(closed) == []


def test_a_label_on_its_own_line_is_not_content():
    text = VALID.replace(f"{F} 20", f"{F} **Final Answer**\n\\[ \\boxed{{20}} \\]")
    assert parse_trace(text).final_answer == "\\[ \\boxed{20} \\]"
    assert validate_trace(text) == []
    only_label = VALID.replace(f"{P} Add, then multiply.", f"{P} ### Plan:\n")
    assert validate_trace(only_label) == [Violation.EMPTY_SECTION]
    # a one-word section that happens to be a label word is content, not a label
    assert parse_trace(f"{P} plan\n{G} rule").texts(Glyph.PLAN) == ["plan"]


def test_a_looping_output_that_repeats_the_final_glyph_is_invalid():
    loop = VALID + "".join(f"\n{T} So 20.\n{F} 20" for _ in range(3))
    assert set(validate_trace(loop)) == {Violation.DUPLICATE_GLYPH, Violation.WRONG_ORDER}
