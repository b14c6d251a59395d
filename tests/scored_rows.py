"""A scored completion row (the evaluate stage's COMPLETION_SCHEMA) built from a source, a
difficulty level and what the model did: the input of the metrics and sweep tests."""

from __future__ import annotations

from typing import Any

from glyph_core.evaluate import stratum_of

MATH_BUCKET = {1: "easy", 2: "easy", 3: "medium", 4: "hard", 5: "hard"}
GSM8K_BUCKET = {2: "easy", 3: "easy", 4: "medium", 5: "medium", 6: "hard", 7: "hard"}


def scored_row(model: str, pid: str, source: str, level: int, emerged: bool, **kw: Any) -> dict[str, Any]:
    bucket = (MATH_BUCKET if source == "math" else GSM8K_BUCKET)[level]
    difficulty = (level - 1) / 4 if source == "math" else min(1.0, max(0.0, (level - 2) / 6))
    return {
        "model": model,
        "id": pid,
        "source": source,
        "bucket": bucket,
        "difficulty": difficulty,
        "level": level,
        "stratum": stratum_of(source, level),
        "finish_reason": kw.get("finish_reason", "stop"),
        "truncated": kw.get("finish_reason") == "length",
        "completion_tokens": 10,
        "emerged": emerged,
        "partial": False,
        "valid": kw.get("valid", emerged),
        "correct": kw.get("correct", False),
        "violations": [],
        "glyph_kinds": 5 if emerged else 0,
        "orig_bucket": kw.get("orig_bucket", "easy"),
        "orig_emerged": emerged,
        "orig_valid": emerged,
        "orig_correct": False,
    }
