"""The teacher interface: one request in, `n` completions out, whatever the engine.

Generation (the generate stage) and evaluation (the evaluate stage) both go through this
interface, so there is one place that knows how to drive each engine.

A teacher built with `TeacherConfig.adapters` (LoRA adapter directories trained on its model)
serves those adapters too: `generate(..., adapter=dir)` answers with the adapter, without it
with the base model. That is how evaluation runs base and tuned in one vLLM engine (one GPU's
memory) instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GenRequest:
    id: str
    messages: list[dict[str, str]]
    # The unified problem row; only the reference teacher reads it (it needs the gold solution).
    problem: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class Teacher(Protocol):
    name: str

    def generate(
        self, requests: list[GenRequest], n: int = 1, adapter: str | None = None
    ) -> list[list[Completion]]:
        """`n` completions per request, in request order; failures come back as
        `finish_reason="error"` completions instead of exceptions, so a shard never dies
        for one bad request. `adapter` (one of the config's `adapters`) selects a LoRA adapter;
        an adapter the teacher was not built with is a `GlyphError`."""
        ...

    def close(self) -> None: ...
