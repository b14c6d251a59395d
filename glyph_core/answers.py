"""Answer extraction, gold extraction and equivalence (math-verify + numeric fallback).

Why not "compare the last number" (what the original glyph scripts did): it marks
`\\frac{1}{2}` vs `0.5`, `1,000` vs `1000` or `$18.00` vs `18` wrong and accepts any trace that
happens to end with the right digit. Here:

* :func:`extract_answer` reads, in order, the 🝞 final-answer section, the last
  ``\\boxed{}``/``\\fbox{}`` (nested braces), an explicit "answer is …"/"Final answer: …", and
  only for a completion that ended on its own, the last number. It is built for what tuned
  models really write: display maths on the lines after "the final answer is:", a 🝞 section
  that is a sentence ("Myrtle has 16 eggs."), answers repeated in a loop, completions cut off
  at the token limit (no last-number guess from unfinished reasoning; a section cut inside
  ``\\boxed{…`` has no answer). docs/evaluation.md lists the cases with examples.
* :func:`is_equivalent` first tries cheap, exact comparisons (normalised strings, then exact
  rational arithmetic on plain numbers, fractions, percents, currency and unit-suffixed
  numbers). When both sides are plain numbers the cheap path *decides* (equal or not), so the
  expensive math-verify/sympy path only runs for real LaTeX expressions. Parsed golds and
  predictions are memoised, so a gold is parsed once per process however many samples it has.
* math-verify enforces its timeouts with ``signal.alarm``, which raises outside the main
  thread. We pass ``parsing_timeout``/``timeout_seconds`` only in a main thread (worker
  processes included) and ``None`` elsewhere, so checking works from thread pools too.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction
from functools import lru_cache
from typing import Any

from glyph_core.glyphs import Glyph, parse_trace
from glyph_core.latex import (
    DISPLAY_MATH,
    INLINE_MATH,
    last_box_open,
    last_boxed,
    math_spans,
    open_math,
)

FINAL_GLYPH = Glyph.FINAL.value  # 🝞
MATH_VERIFY_TIMEOUT_S = 5
_MAX_VERIFY_CHARS = 1000  # longer "answers" are prose, not expressions; sympy can hang on them

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every timeout=None call

# ---------------------------------------------------------------------------------------------
# answer extraction from model output

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# "the answer is", "Final answer:", "**Final Answer**:", "answer = ..." (the value follows it)
_ANSWER_MARK = re.compile(
    r"\b(?:final\s+answer|answer)\b(?:\s*\*\*)?\s*(?:is\b|:|=)\s*:?(?:\s*\*\*)?", re.IGNORECASE
)
_SENTENCE_END = re.compile(r"[.!?;](?=\s|$)|\n")
# Inline maths that opens a statement may span lines (a pmatrix); same rule as INLINE_MATH.
_LEADING_INLINE = re.compile(r"\$(?!\s)([^$]*?[^\s$\\])\$(?!\d)")
_COPULA = re.compile(r"\b(?:is|are|was|were|equals)\b|=", re.IGNORECASE)
# A LaTeX command with a brace group of letters (\begin{pmatrix}, \text{ cm}): not prose words.
_LATEX_CMD = re.compile(r"\\[A-Za-z]+(?:\{[A-Za-z*\s]*\})?")
_WORD = re.compile(r"[A-Za-z]{2,}")
# A truncated completion's last run of characters may itself be cut ("4" of "42") unless it
# ends a sentence or closes a group.
_TAIL = re.compile(r"\S+$")
_CLOSED_TAIL = re.compile(r"[.!?}\])$*]$")


def complete_prefix(text: str) -> str:
    """``text`` without its last run of non-space characters when that run may be cut off."""
    m = _TAIL.search(text)
    if m and not _CLOSED_TAIL.search(m.group()):
        return text[: m.start()]
    return text


def _clean_span(ans: str) -> str:
    ans = ans.strip()
    # "$42$." -> "42"; a sentence-ending period is not part of the answer ("3.5" keeps its dot)
    ans = re.sub(r"[.;,:]+$", "", ans).strip()
    if len(ans) >= 4 and ans.startswith("$$") and ans.endswith("$$") and ans.count("$") == 4:
        ans = ans[2:-2].strip()
    elif len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$" and ans.count("$") == 2:
        ans = ans[1:-1].strip()
    elif ans.startswith("\\(") and ans.endswith("\\)") or ans.startswith("\\[") and ans.endswith("\\]"):
        ans = ans[2:-2].strip()
    ans = re.sub(r"^\*\*|\*\*$", "", ans).strip()
    return re.sub(r"[.;,]+$", "", ans).strip()


def _leading_statement(text: str) -> str | None:
    """What ``text`` states first: a maths block it opens with (it may span lines: display
    maths, a matrix), else its first sentence; a lead-in line ending in ":" ("Therefore:") is
    skipped. None when it opens maths that never closes (cut off)."""
    body = text.lstrip()
    while body:
        if body.startswith(("\\[", "$$", "\\(")):
            m = DISPLAY_MATH.match(body) or INLINE_MATH.match(body)
            return m.group(0) if m else None
        m = _LEADING_INLINE.match(body)
        if m:
            return m.group(0)
        end = _SENTENCE_END.search(body)
        statement = body[: end.start()] if end else body
        if not statement.rstrip().endswith(":") or not end:
            return statement
        body = body[end.end() :].lstrip()
    return ""


def _candidates(text: str) -> tuple[list[tuple[int, str]], str]:
    """Maths spans and plain numbers in ``text`` with their positions, and ``text`` with its
    maths blanked out (so words and copulas are only looked for in the prose)."""
    found: list[tuple[int, str]] = []
    prose = list(text)
    for start, end, content in math_spans(text):
        found.append((start, content))
        prose[start:end] = " " * (end - start)
    blanked = "".join(prose)
    found += [(m.start(), m.group()) for m in _NUMBER_RE.finditer(blanked)]
    return sorted(found), blanked


def _pick(statement: str, *, first: bool) -> str:
    """The answer inside a statement. A bare expression ("16", "$\\frac{3}{4}$", "16 eggs",
    "x = 5 or x = -2") is the answer as written. A sentence around numbers or maths ("Myrtle
    has 16 eggs.") gives one of them: the first when ``first`` (the statement follows "the
    answer is"), else the first after the last copula (is, are, =, equals) that has one, else
    the last."""
    if any(rx.fullmatch(statement.strip()) for rx in (DISPLAY_MATH, INLINE_MATH, _LEADING_INLINE)):
        return statement  # one maths block: an expression, whatever words its LaTeX holds
    found, prose = _candidates(statement)
    if not found or len(_WORD.findall(_LATEX_CMD.sub(" ", prose))) < 2:
        return statement
    if first or len(found) == 1:
        return found[0][1]
    for cop in reversed(list(_COPULA.finditer(prose))):
        after = [c for pos, c in found if pos >= cop.end()]
        if after:
            return after[0]
    return found[-1][1]


def _after_marker(text: str) -> str | None:
    """The answer after the last "answer is"/"Final answer:" marker that states one."""
    for m in reversed(list(_ANSWER_MARK.finditer(text))):
        statement = _leading_statement(text[m.end() :])
        if statement:
            ans = _clean_span(_pick(statement, first=True))
            if ans:
                return ans
    return None


def answer_from_final(final: str | None) -> str | None:
    """The answer inside a 🝞 section (label already stripped), or None.

    In order: None when the section is cut off inside its maths (:func:`open_math`: an unclosed
    ``\\boxed{`` or ``\\[``); its last ``\\boxed{}``; the value after an "answer is" marker;
    else its first statement (a display-maths block, or the first sentence), reduced to the
    number or maths in it when it is a sentence (:func:`_pick`).
    """
    if not final or not final.strip():
        return None
    if open_math(final):
        return None
    boxed = last_boxed(final)
    if boxed is not None:
        return boxed or None
    said = _after_marker(final)
    if said:
        return said
    statement = _leading_statement(final)
    if not statement:
        return None
    return _clean_span(_pick(statement, first=False)) or None


def _last_final_section(text: str) -> str | None:
    """The last 🝞 section with content (a looping output repeats 🝞; the last one may be empty
    or cut), or None when the text has no 🝞."""
    finals = parse_trace(text).texts(Glyph.FINAL)
    if not finals:
        return None
    return next((f for f in reversed(finals) if f), "")


def extract_answer(text: str | None, *, truncated: bool = False) -> str | None:
    """The model's final answer, or None when it gave none.

    In order: the last non-empty 🝞 section (:func:`answer_from_final`; a section cut inside its
    maths gives no answer at all); the last ``\\boxed{}``/``\\fbox{}`` unless the last box is
    unclosed; the value after the last "answer is"/"Final answer:" marker; and only for a
    completion that ended on its own, the last number.

    ``truncated`` (the generation hit its token limit): the explicit markers above still count,
    but the last run of characters is dropped when it may be cut ("4" of "42"), and there is no
    last-number guess: that number would come from unfinished reasoning (a modulus, an index).
    """
    if not text:
        return None
    if truncated:
        text = complete_prefix(text)
    final = _last_final_section(text)
    if final is not None:
        if final and open_math(final):
            return None
        ans = answer_from_final(final)
        if ans:
            return ans
    if not last_box_open(text):
        boxed = last_boxed(text)
        if boxed:
            return boxed
    said = _after_marker(text)
    if said:
        return said
    if truncated:
        return None
    nums = _NUMBER_RE.findall(text)
    if nums:
        return nums[-1].replace(",", "")
    return None


# ---------------------------------------------------------------------------------------------
# gold extraction


def gsm8k_gold(answer_field: str) -> str:
    """GSM8K: the text after ``####``, thousands separators removed. ValueError if absent."""
    if "####" not in answer_field:
        raise ValueError("no '####' final-answer marker")
    gold = answer_field.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise ValueError("empty answer after '####'")
    return gold


def math_gold(solution: str) -> str:
    """MATH: the last ``\\boxed{}`` (or ``\\fbox{}``, or ``\\boxed 5``) of the solution."""
    gold = last_boxed(solution)
    if not gold:
        raise ValueError("no \\boxed{} answer in solution")
    return gold


def svamp_gold(value: float | int) -> str:
    """SVAMP: the float ``Answer`` as a short string: 51.0 -> "51", 0.5 -> "0.5"."""
    x = float(value)
    if x.is_integer():
        return str(int(x))
    return repr(x)


# ---------------------------------------------------------------------------------------------
# normalisation and the cheap comparison

_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox|textnormal|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ|\\degree")
_UNIT_TAIL = re.compile(r"^(.*?\d)\s+([a-zA-Z][a-zA-Z.]*(?:\s+[a-zA-Z][a-zA-Z.]*)*(?:\^\{?\d\}?)?)$")
_NOT_UNITS = {"pi", "i", "e", "x", "y", "z", "n", "k", "and", "or", "sqrt"}
_ASSIGN = re.compile(r"^[a-zA-Z]\s*=\s*(?=[^=]+$)")


def normalize_answer(ans: str) -> str:
    """A canonical string form: cosmetic LaTeX, ``$``, spaces, ``\\text{}`` wrappers removed."""
    s = ans.strip()
    boxed = last_boxed(s)
    if boxed is not None and s.startswith(("\\boxed", "\\fbox")):
        s = boxed
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "")
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # a forced space "\ ", not a matrix row break "\\" and a space
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = s.replace("{,}", ",")
    s = _DEGREES.sub("", s)
    for _ in range(2):
        s = _TEXT_CMD.sub(r" \1 ", s)
    s = s.strip()
    s = re.sub(r"[.。]+$", "", s).strip()
    s = _ASSIGN.sub("", s)
    return " ".join(s.split())


def _unit_stripped(s: str) -> str:
    m = _UNIT_TAIL.match(s)
    if m and not (set(m.group(2).lower().replace(".", " ").split()) & _NOT_UNITS):
        return m.group(1)
    return s


@lru_cache(maxsize=65536)
def to_number(ans: str) -> Fraction | None:
    """An exact rational for plain numeric answers (commas, $, %, units, a/b, \\frac), else None."""
    s = _unit_stripped(normalize_answer(ans))
    s = s.replace("\\%", "").replace("%", "").strip()
    if not s:
        return None
    neg = False
    if s.startswith("-"):
        neg, s = True, s[1:].strip()
    elif s.startswith("+"):
        s = s[1:].strip()
    m = _FRAC.fullmatch(s) or _FRAC_SHORT.fullmatch(s)
    try:
        if m:
            num, den = (_plain_number(m.group(1)), _plain_number(m.group(2)))
            if num is None or den is None or den == 0:
                return None
            val = num / den
        elif re.fullmatch(r"\d+\s*/\s*\d+", s):
            a, b = s.split("/")
            if int(b) == 0:
                return None
            val = Fraction(int(a), int(b))
        else:
            plain = _plain_number(s)
            if plain is None:
                return None
            val = plain
    except (ValueError, ZeroDivisionError):
        return None
    return -val if neg else val


def _plain_number(s: str) -> Fraction | None:
    s = s.strip()
    neg = s.startswith("-")
    if neg:
        s = s[1:].strip()
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if not re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", s):
        return None
    val = Fraction(s)
    return -val if neg else val


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    if a == b:
        return True
    # a rounded decimal of a repeating fraction (0.333333 vs 1/3): relative 1e-6, as math-verify
    return abs(a - b) <= Fraction(1, 10**6) * max(Fraction(1), abs(b)) and (
        a.denominator != 1 or b.denominator != 1
    )


# ---------------------------------------------------------------------------------------------
# math-verify


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _latex_wrap(s: str) -> str:
    s = s.strip()
    if "$" in s or "\\boxed" in s or "\\(" in s or "\\[" in s:
        return s
    return f"${s}$"


@lru_cache(maxsize=65536)
def _mv_parse(s: str, main_thread: bool) -> Any:
    from math_verify import parse

    timeout = MATH_VERIFY_TIMEOUT_S if main_thread else None
    try:
        return parse(_latex_wrap(s), parsing_timeout=timeout)
    except Exception:  # math-verify raises on pathological input despite raise_on_error=False
        return []


def _mv_verify(gold: str, pred: str) -> bool:
    from math_verify import verify

    main = _in_main_thread()
    g, p = _mv_parse(gold, main), _mv_parse(pred, main)
    if not g or not p:
        return False
    try:
        return bool(verify(g, p, timeout_seconds=MATH_VERIFY_TIMEOUT_S if main else None))
    except Exception:
        return False


def is_equivalent(pred: str | None, gold: str) -> bool:
    """True when the predicted answer equals the gold answer mathematically.

    Cheap exact checks first; math-verify only when a side is not a plain number.
    """
    if pred is None:
        return False
    pred, gold = pred.strip(), gold.strip()
    if not pred:
        return False
    if pred == gold:
        return True
    np_, ng = normalize_answer(pred), normalize_answer(gold)
    if np_ and (np_ == ng or np_.replace(" ", "") == ng.replace(" ", "")):
        return True
    if np_.lower().strip("()") == ng.lower().strip("()") and re.fullmatch(r"\(?[A-Ea-e]\)?", ng):
        return True  # multiple-choice letters: "(C)" vs "C"
    a, b = to_number(pred), to_number(gold)
    if a is not None and b is not None:
        return _numbers_equal(a, b)  # both plain numbers: decided, skip sympy
    if len(pred) > _MAX_VERIFY_CHARS:
        return False
    return _mv_verify(gold, pred)
