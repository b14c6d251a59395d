"""Answer extraction, gold extraction and equivalence (DESIGN §2: math-verify + numeric fallback).

Why not "compare the last number" (what the original glyph scripts did): it marks
`\\frac{1}{2}` vs `0.5`, `1,000` vs `1000` or `$18.00` vs `18` wrong and accepts any trace that
happens to end with the right digit. Here:

* :func:`extract_answer` reads, in order, the 🝞 final-answer section, the last
  ``\\boxed{}``/``\\fbox{}`` (nested braces), an explicit "answer is …"/"Answer: …", and only
  then the last number.
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

FINAL_GLYPH = "\U0001f75e"  # 🝞
MATH_VERIFY_TIMEOUT_S = 5
_MAX_VERIFY_CHARS = 1000  # longer "answers" are prose, not expressions; sympy can hang on them

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every timeout=None call

# ---------------------------------------------------------------------------------------------
# boxed extraction


_BOX_CMD = re.compile(r"\\(?:boxed|fbox)")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == '{'`` and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "\\":  # skip escaped braces like \{ and \}
            continue
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def boxed_contents(text: str) -> list[str]:
    """Every ``\\boxed{...}``/``\\fbox{...}`` content, in order, nested braces kept.

    Also accepts the brace-less form ``\\boxed 5`` (MATH has a few), which runs to the next
    whitespace or ``$``. An unbalanced (truncated) box is skipped.
    """
    out: list[str] = []
    for m in _BOX_CMD.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            got = _braced(text, i)
            if got is not None:
                out.append(got[0].strip())
        elif i > m.end():  # "\boxed 5": a space is required, else it is another macro (\boxedx)
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                out.append(tok.group(0).rstrip(".,"))
    return out


def last_boxed(text: str) -> str | None:
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else None


# ---------------------------------------------------------------------------------------------
# answer extraction from model output

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(.+?)(?:\n|$)",
    re.IGNORECASE,
)


def _final_section(text: str) -> str | None:
    try:
        from glyph_core.glyphs import parse_trace
    except ImportError:  # pragma: no cover - the lead's module always exists in the package
        idx = text.rfind(FINAL_GLYPH)
        return text[idx + len(FINAL_GLYPH) :].strip() or None
    return parse_trace(text).final_answer


def _clean_span(ans: str) -> str:
    ans = ans.strip()
    # "$42$." -> "42"; a sentence-ending period is not part of the answer ("3.5" keeps its dot)
    ans = re.sub(r"[.;,]+$", "", ans).strip()
    if len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$" and ans.count("$") == 2:
        ans = ans[1:-1].strip()
    elif ans.startswith("\\(") and ans.endswith("\\)") or ans.startswith("\\[") and ans.endswith("\\]"):
        ans = ans[2:-2].strip()
    ans = re.sub(r"^\*\*|\*\*$", "", ans).strip()
    return ans


def answer_from_final(final: str | None) -> str | None:
    """The answer inside a 🝞 section: its last ``\\boxed{}``, else the section without ``$``/period."""
    if not final:
        return None
    boxed = last_boxed(final)
    if boxed is not None:
        return boxed or None
    said = _ANSWER_IS.findall(final)  # "🝞 The answer is 42." -> "42"
    return _clean_span(said[-1] if said else final) or None


def extract_answer(text: str | None) -> str | None:
    """The model's final answer, or None when it gave none. Order documented in the module."""
    if not text:
        return None
    if FINAL_GLYPH in text:
        ans = answer_from_final(_final_section(text))
        if ans:
            return ans
    boxed = last_boxed(text)
    if boxed:
        return boxed
    matches = _ANSWER_IS.findall(text)
    if matches:
        ans = _clean_span(matches[-1])
        if ans:
            return ans
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
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", " ")
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
