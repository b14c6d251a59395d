"""The original study's workload built from the real data with the pipeline's own functions.

unify (every training and held-out problem of GSM8K, SVAMP and MATH) → the reference teacher's
glyph traces → filter → rewrite, in this process and without a store, so that a benchmark on a
GPU host gets real SFT rows (lengths, prompts, the glyph/natural mix) from the data folder alone.
Used by `benchmarks/sft_loss_check.py` (rows to train on) and `benchmarks/projection.py` (token
counts of the whole study).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from glyph_core.config import FilterConfig, GenerateConfig, RewriteConfig, TeacherConfig, UnifyConfig
from glyph_core.filter import filter_traces
from glyph_core.generate import generate_shard, select_problems
from glyph_core.rewrite import rewrite
from glyph_core.teachers.reference import ReferenceTeacher
from glyph_core.unify import unify


@dataclass
class StudyRows:
    problems: pa.Table  # the unified problem table (train and test)
    traces: pa.Table  # the reference teacher's traces, one per training problem
    kept: pa.Table  # traces that pass the filter
    sft: pa.Table  # chat-format SFT rows (rewrite)
    rewrite_stats: dict[str, int]


def study_rows(
    data_dir: str | Path,
    *,
    max_train_per_source: int | None = None,
    glyph_min_bucket: str = "hard",
    natural_ratio: float = 0.5,
    filter_workers: int = 0,
) -> StudyRows:
    """The SFT rows of the study on `data_dir` (the `full` profile's rewrite settings by default)."""
    problems = unify(UnifyConfig(data_dir=str(data_dir), max_train_per_source=max_train_per_source)).table
    gen_cfg = GenerateConfig(teacher=TeacherConfig(backend="reference", model="reference", n=1))
    todo: list[dict[str, Any]] = select_problems(problems, gen_cfg)
    traces = generate_shard(ReferenceTeacher(), todo, gen_cfg)
    kept = filter_traces(
        traces, problems, FilterConfig(max_completion_tokens=10**6, workers=filter_workers)
    ).kept
    result = rewrite(
        kept, problems, RewriteConfig(glyph_min_bucket=glyph_min_bucket, natural_ratio=natural_ratio)
    )  # type: ignore[arg-type]
    return StudyRows(
        problems=problems, traces=traces, kept=kept, sft=result.table, rewrite_stats=result.stats
    )
