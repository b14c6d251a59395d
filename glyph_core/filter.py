"""Filter teacher traces: keep well-formed, complete, correct, distinct ones; count every drop.

Each dropped trace gets exactly one reason: the first failing check, in this order

1. ``truncated``    — ``finish_reason == "length"`` (the root cause; such a trace usually
                      also fails the later checks, and counting it there would mislead);
2. ``too_long``     — ``completion_tokens > cfg.max_completion_tokens``;
3. ``bad_structure``— :func:`glyph_core.glyphs.validate_trace` reports any violation;
4. ``wrong_answer`` — the 🝞 answer (:func:`glyph_core.answers.extract_answer` order) is not
                      :func:`~glyph_core.answers.is_equivalent` to the problem's gold answer;
5. ``duplicate``    — same ``id`` and the same completion after whitespace normalisation as an
                      earlier surviving trace (lowest ``sample`` first).

Cheap vectorised checks (1, 2) run first; 3–4 run per trace, in a process pool when the
table is large. Traces are sorted by problem id before chunking, so each gold answer is parsed
once per worker (memoised in :mod:`glyph_core.answers`). A trace whose ``id`` is not in the
problems table is a :class:`SchemaError`; one whose problem is held out is a
:class:`LeakageError` (held-out problems must never reach generate; README.md, "Data, splits and difficulty").
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from glyph_core.answers import answer_from_final, extract_answer, is_equivalent
from glyph_core.config import FilterConfig
from glyph_core.errors import LeakageError, SchemaError
from glyph_core.glyphs import parse_trace, validate_trace
from glyph_core.outputs import Progress, StageOutput, StageStats, Timer
from glyph_core.storage import DatasetRef, Store, stage_key

VERSION = "1"
"""Bump when this module changes what the stage writes (Prefect's TASK_SOURCE cannot see it)."""

CHECK_ORDER: tuple[str, ...] = ("truncated", "too_long", "bad_structure", "wrong_answer", "duplicate")
DROP_REASONS = CHECK_ORDER  # the drops table lists every reason, in check order
TRACE_COLUMNS = ("id", "sample", "completion", "finish_reason", "completion_tokens")
PARALLEL_MIN_ROWS = 4000  # below this a pool's start-up costs more than it saves
CHUNK_ROWS = 2500

_OK, _BAD_STRUCTURE, _WRONG = 0, 1, 2


@dataclass
class FilterResult:
    kept: pa.Table
    drops: pa.Table  # columns reason, count; every reason present, in check order

    def drop_counts(self) -> dict[str, int]:
        return dict(zip(self.drops["reason"].to_pylist(), self.drops["count"].to_pylist(), strict=True))


def check_one(completion: str, gold: str, require_structure: bool = True) -> int:
    """0 = keep, 1 = bad structure, 2 = wrong answer (structure is checked first)."""
    if require_structure:
        trace = parse_trace(completion)
        if validate_trace(trace):
            return _BAD_STRUCTURE
        pred = answer_from_final(trace.final_answer)
    else:
        pred = extract_answer(completion)
    return _OK if is_equivalent(pred, gold) else _WRONG


def _check_chunk(items: list[tuple[str, str]], require_structure: bool) -> list[int]:
    return [check_one(c, g, require_structure) for c, g in items]


def _require(table: pa.Table, cols: tuple[str, ...], what: str) -> None:
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise SchemaError(f"{what} table lacks column(s) {missing}; has {table.column_names}")


def _workers(cfg: FilterConfig) -> int:
    return cfg.workers if cfg.workers > 0 else (os.cpu_count() or 1)


def _normalized(text: str) -> str:
    return " ".join(text.split())


def filter_traces(
    traces: pa.Table,
    problems: pa.Table,
    cfg: FilterConfig,
    *,
    progress: Callable[[int], None] | None = None,
) -> FilterResult:
    """Apply the checks in :data:`CHECK_ORDER`; ``progress(n)`` is called as n traces are done.

    ``cfg.require_structure=False`` skips the glyph check, for natural-prompt generations.
    """
    _require(traces, TRACE_COLUMNS, "traces")
    _require(problems, ("id", "answer", "split"), "problems")
    n = traces.num_rows
    pid = problems["id"].to_pylist()
    gold_of = dict(zip(pid, problems["answer"].to_pylist(), strict=True))
    split_of = dict(zip(pid, problems["split"].to_pylist(), strict=True))
    ids = traces["id"].to_pylist()
    unknown = sorted({i for i in ids if i not in gold_of})
    if unknown:
        raise SchemaError(f"{len(unknown)} trace id(s) not in the problems table, e.g. {unknown[:5]}")
    held = sorted({i for i in ids if split_of[i] != "train"})
    if held:
        raise LeakageError(f"traces exist for {len(held)} held-out problem(s), e.g. {held[:5]}")

    reason: list[str | None] = [None] * n
    truncated = pc.fill_null(pc.equal(traces["finish_reason"], "length"), False).to_pylist()
    too_long = pc.fill_null(
        pc.greater(traces["completion_tokens"], cfg.max_completion_tokens), False
    ).to_pylist()
    for i in range(n):
        if truncated[i]:
            reason[i] = "truncated"
        elif too_long[i]:
            reason[i] = "too_long"

    if progress:
        progress(n - sum(r is None for r in reason))  # decided by the vectorised checks
    completions = traces["completion"].to_pylist()
    todo = sorted((i for i in range(n) if reason[i] is None), key=lambda i: ids[i])
    items = [(completions[i] or "", gold_of[ids[i]]) for i in todo]
    codes = _run_checks(items, _workers(cfg), cfg.require_structure, progress)
    for i, code in zip(todo, codes, strict=True):
        if code == _BAD_STRUCTURE:
            reason[i] = "bad_structure"
        elif code == _WRONG:
            reason[i] = "wrong_answer"

    samples = traces["sample"].to_pylist()
    seen: set[tuple[str, str]] = set()
    for i in sorted((i for i in range(n) if reason[i] is None), key=lambda i: (samples[i], i)):
        key = (ids[i], _normalized(completions[i] or ""))
        if key in seen:
            reason[i] = "duplicate"
        else:
            seen.add(key)

    keep = pa.array([r is None for r in reason], type=pa.bool_())
    counts = {r: 0 for r in DROP_REASONS}
    for r in reason:
        if r is not None:
            counts[r] += 1
    drops = pa.table(
        {"reason": list(DROP_REASONS), "count": pa.array([counts[r] for r in DROP_REASONS], pa.int64())}
    )
    return FilterResult(kept=traces.filter(keep), drops=drops)


def _run_checks(
    items: list[tuple[str, str]],
    workers: int,
    require_structure: bool,
    progress: Callable[[int], None] | None,
) -> list[int]:
    chunks = [items[i : i + CHUNK_ROWS] for i in range(0, len(items), CHUNK_ROWS)]
    out: list[int] = []
    if workers <= 1 or len(items) < PARALLEL_MIN_ROWS:
        for chunk in chunks:
            out += _check_chunk(chunk, require_structure)
            if progress:
                progress(len(chunk))
        return out
    # spawn, not fork: the caller may hold threads (Prefect, pyarrow) that fork would copy mid-lock
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
        for chunk, codes in zip(
            chunks, pool.map(_check_chunk, chunks, [require_structure] * len(chunks)), strict=True
        ):
            out += codes
            if progress:
                progress(len(chunk))
    return out


# ---------------------------------------------------------------------------------------------
# the stage (declared in glyph_core/stages.py)


def key(cfg: FilterConfig, *, traces: DatasetRef, problems: DatasetRef) -> str:
    return stage_key(
        "filter", VERSION, {"problems": problems.sha256, "traces": traces.sha256}, cfg.key_dump()
    )


def run(
    store: Store,
    cfg: FilterConfig,
    *,
    traces: DatasetRef,
    problems: DatasetRef,
    progress: Progress | None = None,
) -> StageOutput:
    """Keep the traces with a correct answer and a valid structure; record every drop by reason."""
    timer = Timer()
    out_key = key(cfg, traces=traces, problems=problems)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, traces.rows)

    result = filter_traces(store.read_table(traces), store.read_table(problems), cfg, progress=advance)
    kept = store.write_table(result.kept, "filter", out_key, "kept.parquet")
    drops = store.write_table(result.drops, "filter", out_key, "drops.parquet")
    return StageOutput(
        stage="filter",
        key=out_key,
        refs={"kept": kept, "drops": drops},
        stats=StageStats(
            rows_in=traces.rows,
            rows_out=kept.rows,
            drops={k: int(v) for k, v in result.drop_counts().items()},
            seconds=timer.seconds,
        ),
    )
