"""Teacher backends behind one interface (`base.Teacher`), chosen by `TeacherConfig.backend`
from the registry in `glyph_core.teachers.registry`."""

from __future__ import annotations

from glyph_core.teachers.base import Completion, GenRequest, Teacher
from glyph_core.teachers.registry import make_teacher

__all__ = ["Completion", "GenRequest", "Teacher", "make_teacher"]
