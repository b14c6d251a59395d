"""The reference teacher: a glyph trace built deterministically from the gold solution.

Why: it bootstraps the whole pipeline without a teacher model (CPU demos, tests, a baseline for
what a model teacher adds), and its traces are correct by construction. Its guideline, plan and
takeaway are short templates, so its rows are labelled `teacher="reference"` and must never be
mistaken for model output.

Per source (the unified problem table, glyph_core/unify.py):
* GSM8K: every solution line before `####` is a step, with the `<<a*b=c>>` calculator marks
  removed; the final answer is the `answer` column (the text after `####`).
* MATH: the solution's sentences are steps (split outside `$…$`/`\\[…\\]` only, so a formula is
  never cut); the final answer is the `answer` column (the last `\\boxed{}`).
* SVAMP: the equation, with its result, is the single step.

Token counts are approximate (words and punctuation marks), since no tokenizer is involved.
"""

from __future__ import annotations

import re
from typing import Any

from glyph_core.errors import GlyphError
from glyph_core.glyphs import format_trace
from glyph_core.teachers.base import Completion, GenRequest

_CALC = re.compile(r"<<[^<>]*>>")
_TOKENS = re.compile(r"\w+|[^\w\s]")
_MIN_STEP_CHARS = 25  # shorter sentences ("So $x=3$.") are merged into their neighbour


def approx_tokens(text: str) -> int:
    return len(_TOKENS.findall(text))


def gsm8k_steps(solution: str) -> list[str]:
    body = solution.rsplit("####", 1)[0]
    lines = [_CALC.sub("", line).strip() for line in body.splitlines()]
    return [re.sub(r"\s{2,}", " ", line) for line in lines if line]


def split_sentences(text: str) -> list[str]:
    """Sentence ends (`.`, `!`, `?` followed by whitespace) outside math mode.

    Math mode is `$…$`, `$$…$$`, `\\[…\\]` and `\\(…\\)`; a period inside `$3.5$` or at the end
    of a displayed equation is not a sentence end of the prose.
    """
    out: list[str] = []
    start = 0
    in_math: str | None = None  # the closing delimiter we wait for
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        two = text[i : i + 2]
        if c == "\\" and two in ("\\[", "\\(") and in_math is None:
            in_math = "\\]" if two == "\\[" else "\\)"
            i += 2
            continue
        if in_math in ("\\]", "\\)") and two == in_math:
            in_math = None
            i += 2
            continue
        if c == "\\":  # an escaped character (\$, \%) is not a delimiter
            i += 2
            continue
        if c == "$":
            delim = "$$" if two == "$$" else "$"
            if in_math is None:
                in_math = delim
            elif in_math == delim:
                in_math = None
            i += len(delim)
            continue
        if in_math is None and c in ".!?" and (i + 1 == n or text[i + 1].isspace()):
            out.append(text[start : i + 1])
            start = i + 1
        i += 1
    out.append(text[start:])
    sentences = [re.sub(r"\s+", " ", s).strip() for s in out]
    return [s for s in sentences if s]


def math_steps(solution: str) -> list[str]:
    merged: list[str] = []
    for sentence in split_sentences(solution):
        if merged and len(merged[-1]) < _MIN_STEP_CHARS:
            merged[-1] = f"{merged[-1]} {sentence}"
        else:
            merged.append(sentence)
    if len(merged) > 1 and len(merged[-1]) < _MIN_STEP_CHARS:
        tail = merged.pop()
        merged[-1] = f"{merged[-1]} {tail}"
    return merged


def _num(token: str) -> str:
    """`76.0` -> `76`, keeping real decimals: SVAMP writes every number as a float."""
    try:
        value = float(token)
    except ValueError:
        return token
    return str(int(value)) if value.is_integer() else token


def svamp_steps(equation: str, answer: str) -> list[str]:
    expr = " ".join(_num(t) for t in equation.split())
    expr = re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", expr))
    if expr.startswith("(") and expr.endswith(")") and expr.count("(") == 1:
        expr = expr[1:-1]
    return [f"Compute {expr} = {answer}."]


def _plan(source: str, steps: int, kind: str | None) -> tuple[str, str]:
    if source == "gsm8k":
        return (
            "Turn the story into arithmetic: find each unknown quantity from the ones already known.",
            f"Work out the intermediate quantities in {steps} step{'s' if steps != 1 else ''}, "
            "then combine them into the quantity asked for.",
        )
    if source == "svamp":
        return (
            "Identify which quantities the question combines and with which operation.",
            "Write the one equation that links the given numbers to the question and evaluate it.",
        )
    topic = (kind or "mathematics").lower()
    return (
        f"Apply the relevant facts of {topic} to what the problem gives and asks.",
        f"Set up the problem, derive the result in {steps} step{'s' if steps != 1 else ''}, and simplify.",
    )


def reference_trace(problem: dict[str, Any]) -> str:
    """The glyph trace of one unified problem row; raises `ValueError` when the row has no gold."""
    source = str(problem.get("source") or "")
    solution = str(problem.get("solution") or "")
    answer = problem.get("answer")
    if answer is None or not str(answer).strip():
        raise ValueError(f"problem {problem.get('id')!r} has no gold answer")
    answer = str(answer).strip()
    if source == "gsm8k":
        steps = gsm8k_steps(solution)
    elif source == "svamp":
        steps = svamp_steps(solution, answer)
    elif source == "math":
        steps = math_steps(solution)
    else:
        raise ValueError(f"problem {problem.get('id')!r}: no reference recipe for source {source!r}")
    if not steps:
        raise ValueError(f"problem {problem.get('id')!r} has an empty solution")
    guideline, plan = _plan(source, len(steps), problem.get("type"))
    takeaway = f"Putting the steps together, the answer is {answer}."
    return format_trace(guideline, plan, steps, takeaway, answer)


class ReferenceTeacher:
    """Deterministic, instant, needs no model: every sample of a request is the same trace."""

    name = "reference"

    def __init__(self, cfg: object = None) -> None:
        """Every backend is built from its `TeacherConfig`; this one needs nothing from it."""

    def generate(
        self, requests: list[GenRequest], n: int = 1, adapter: str | None = None
    ) -> list[list[Completion]]:
        if adapter is not None:
            raise GlyphError(f"the reference teacher serves no LoRA adapters (got {adapter})")
        out: list[list[Completion]] = []
        for req in requests:
            prompt_tokens = sum(approx_tokens(m.get("content", "")) for m in req.messages)
            try:
                text = reference_trace(req.problem)
                done = Completion(text, "stop", prompt_tokens, approx_tokens(text))
            except ValueError as exc:
                done = Completion("", "error", prompt_tokens, 0, error=f"ReferenceError: {exc}")
            out.append([done] * n)
        return out

    def close(self) -> None:
        return None
