"""The three prompts (README.md, "The glyph protocol and the prompts").

The glyph prompt asks the teacher for the structure explicitly; the latent prompt is what the
student sees in training and evaluation and must never mention tags or symbols (a test checks
this), otherwise "emergence" would only be instruction following. `TEMPLATE_HASH` enters every
cache key downstream, because changing a template must invalidate generated traces even though
Prefect's TASK_SOURCE cannot see this module.
"""

from __future__ import annotations

import hashlib

from glyph_core.glyphs import Glyph

GLYPH_SYSTEM = (
    "You solve math problems using a fixed structure of five symbols. Write each section on its "
    "own line, starting with its symbol, in this order:\n"
    f"{Glyph.GUIDELINE} Guideline: the core rule or intention for this problem.\n"
    f"{Glyph.PLAN} Plan: the approach in a few high-level steps.\n"
    f"{Glyph.STEP} Step: the execution of one step (repeat {Glyph.STEP} for every step).\n"
    f"{Glyph.TAKEAWAY} Takeaway: the conclusion.\n"
    f"{Glyph.FINAL} Final answer: only the final answer, nothing else.\n"
    "Use each symbol except the step symbol exactly once."
)

GLYPH_TEMPLATE = "{question}\n\nSolve this using the five-symbol structure."
LATENT_TEMPLATE = "{question}\n\nSolve this problem carefully and give the final answer."
NATURAL_TEMPLATE = "{question}"


def glyph_messages(question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": GLYPH_SYSTEM},
        {"role": "user", "content": GLYPH_TEMPLATE.format(question=question.strip())},
    ]


def latent_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": LATENT_TEMPLATE.format(question=question.strip())}]


def natural_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": NATURAL_TEMPLATE.format(question=question.strip())}]


PROMPTS = {"glyph": glyph_messages, "latent": latent_messages, "natural": natural_messages}


def messages_for(kind: str, question: str) -> list[dict[str, str]]:
    try:
        return PROMPTS[kind](question)
    except KeyError:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {sorted(PROMPTS)}") from None


TEMPLATE_HASH = hashlib.sha256(
    "\x00".join([GLYPH_SYSTEM, GLYPH_TEMPLATE, LATENT_TEMPLATE, NATURAL_TEMPLATE]).encode()
).hexdigest()[:16]
