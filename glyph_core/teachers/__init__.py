"""Teacher backends behind one interface (`base.Teacher`), chosen by `TeacherConfig.backend`.

Each backend is imported only when asked for, so the package works without vLLM and
`import glyph_core.teachers` does not load torch.
"""

from __future__ import annotations

from glyph_core.config import TeacherConfig
from glyph_core.errors import GlyphError
from glyph_core.teachers.base import Completion, GenRequest, Teacher

__all__ = ["Completion", "GenRequest", "Teacher", "make_teacher"]


def make_teacher(cfg: TeacherConfig) -> Teacher:
    if cfg.backend == "reference":
        from glyph_core.teachers.reference import ReferenceTeacher

        return ReferenceTeacher()
    if cfg.backend == "transformers":
        from glyph_core.teachers.hf import TransformersTeacher

        return TransformersTeacher(cfg)
    if cfg.backend == "openai":
        from glyph_core.teachers.openai_backend import OpenAITeacher

        return OpenAITeacher(cfg)
    if cfg.backend == "vllm":
        from glyph_core.teachers.vllm_backend import VLLMTeacher

        return VLLMTeacher(cfg)
    raise GlyphError(f"unknown teacher backend {cfg.backend!r}")
