"""The teacher backends by name: one registration line per backend.

`TeacherConfig.backend` and `EvalConfig.backend` are validated against these names (config.py
builds its `Literal`s from them, so JSON schemas and `glyph generate --help` list the choices),
and `make_teacher` imports a backend's module only when it is asked for: the package then works
without vLLM, and `glyph --help` does not load torch. A new backend is its module (a class
built from a `TeacherConfig`, implementing `glyph_core.teachers.base.Teacher`) and one line here.

This module imports nothing from `glyph_core.config` at run time (config imports it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glyph_core.errors import GlyphError

if TYPE_CHECKING:  # annotations only: config.py imports this module
    from glyph_core.config import TeacherConfig
    from glyph_core.teachers.base import Teacher


@dataclass(frozen=True)
class Backend:
    target: str
    """`module:Class`; the class is called with the `TeacherConfig`."""
    loads_model: bool
    """Generates from a model directory or Hub id, so the evaluate stage can score a model with it."""


BACKENDS: dict[str, Backend] = {
    "reference": Backend("glyph_core.teachers.reference:ReferenceTeacher", loads_model=False),
    "transformers": Backend("glyph_core.teachers.hf:TransformersTeacher", loads_model=True),
    "openai": Backend("glyph_core.teachers.openai_backend:OpenAITeacher", loads_model=False),
    "vllm": Backend("glyph_core.teachers.vllm_backend:VLLMTeacher", loads_model=True),
}

TEACHER_BACKENDS: tuple[str, ...] = tuple(BACKENDS)
MODEL_BACKENDS: tuple[str, ...] = tuple(name for name, b in BACKENDS.items() if b.loads_model)


def make_teacher(cfg: TeacherConfig) -> Teacher:
    """The backend `cfg.backend` names, built from `cfg`."""
    backend = BACKENDS.get(cfg.backend)
    if backend is None:
        raise GlyphError(f"unknown teacher backend {cfg.backend!r}; expected one of {', '.join(BACKENDS)}")
    module, _, name = backend.target.partition(":")
    teacher: Teacher = getattr(importlib.import_module(module), name)(cfg)
    return teacher
