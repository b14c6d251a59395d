"""The generate stage: a teacher writes traces for the training problems, in shards.

Why shards keyed on content: a generation run is hours on a GPU and dies for reasons outside our
control (OOM killer, preemption, a lost node). Each shard's output is published as soon as it
is done at `generate/shards/{shard_key}/data.parquet`, where the key hashes the shard's problems
(every field a teacher can read), the teacher config's `key_dump()` and the prompt template
hash. A restarted run recomputes the same keys, reuses the published shards and generates only
the missing ones. Because the problem order is a fixed hash order, shards are also prefix
stable: a run with `limit=2000` reuses every shard of an earlier `limit=1000` run.

A fault never crashes a shard: error completions are retried once per shard, then kept as rows
with `finish_reason="error"` and counted by kind; empty, truncated or malformed completions are
kept as well (the filter stage drops them and counts why). But a stage whose work mostly failed
fails: when more than `max_error_rate` of the completions are errors (a dead endpoint, a wrong
model name), `ErrorBudgetExceeded` is raised before the traces table is published, so a failure
is never cached as a result. It is raised as soon as the errors so far exceed the budget of the
whole stage, so a dead teacher fails in one shard's time, not after every shard.

A published shard keeps the completions that succeeded and is reused, but its error rows are
never reused as they are: whenever a shard with errors is read, its failed requests go back to
the teacher and the shard is republished with whatever now succeeds. A fixed endpoint thus
repairs a failed run on the next attempt, without regenerating the rest.

The `teacher` column records who wrote each row as precisely as the backend can tell (for an
OpenAI-compatible endpoint, the model it reports serving), and `GenerateResult.teachers` counts
rows per teacher, reused shards included.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from glyph_core.config import GenerateConfig
from glyph_core.errors import ErrorBudgetExceeded, GlyphError, StorageError
from glyph_core.glyphs import validate_trace
from glyph_core.outputs import Progress, StageOutput, StageStats, Timer
from glyph_core.prompts import TEMPLATE_HASH, messages_for
from glyph_core.storage import DatasetRef, Store, canonical_json, stage_key
from glyph_core.teachers import make_teacher
from glyph_core.teachers.base import Completion, GenRequest, Teacher

log = logging.getLogger(__name__)

VERSION = "1"
STAGE = "generate"
# Fields of a problem row that a teacher may read; all of them enter the shard key.
PROBLEM_FIELDS = ("id", "source", "question", "solution", "answer", "type")

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("sample", pa.int32()),
        ("prompt", pa.string()),  # the chat messages as JSON: backend-independent and exact
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("teacher", pa.string()),
        ("sampling", pa.string()),  # JSON of the sampling parameters and prompt kind
        ("error", pa.string()),
    ]
)

ShardProgress = Callable[[int, int, int, float], None]
"""`(done_shards, total_shards, problems_done, tokens_per_s)`, called after every shard."""


@dataclass
class GenerateResult:
    ref: DatasetRef
    rows: int
    shards_total: int
    shards_generated: int  # generated or repaired in this run
    shards_reused: int
    problems: int
    shards_repaired: int = 0  # reused shards whose error rows were sent to the teacher again
    teachers: dict[str, int] = field(default_factory=dict)  # `teacher` column value -> rows
    errors: dict[str, int] = field(default_factory=dict)  # error kind -> completions
    finish_reasons: dict[str, int] = field(default_factory=dict)
    empty: int = 0
    invalid_structure: int = 0  # only counted for the glyph prompt
    completion_tokens: int = 0  # generated in this run (reused shards excluded)
    generate_s: float = 0.0
    tokens_per_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["ref"] = self.ref.model_dump()
        return out


# -- problem selection and sharding ------------------------------------------------------------


def _order_key(problem_id: str) -> str:
    return hashlib.sha256(problem_id.encode()).hexdigest()


def select_problems(table: pa.Table, cfg: GenerateConfig) -> list[dict[str, Any]]:
    """Rows of the configured split in a fixed hash order (mixes sources), cut at `limit`."""
    missing = [c for c in ("id", "split", "question") if c not in table.column_names]
    if missing:
        raise GlyphError(f"problems table lacks columns {missing}")
    rows = [r for r in table.to_pylist() if r.get("split") == cfg.split]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise GlyphError(f"problems table has duplicate id {dup!r}")
    rows.sort(key=lambda r: _order_key(r["id"]))
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    return rows


def shard_key(problems: list[dict[str, Any]], cfg: GenerateConfig) -> str:
    content = [{f: p.get(f) for f in PROBLEM_FIELDS} for p in problems]
    payload = canonical_json(
        {
            "version": VERSION,
            "problems": content,
            "teacher": cfg.teacher.key_dump(),
            "split": cfg.split,
            "templates": TEMPLATE_HASH,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def shard_uri(store: Store, shard_k: str) -> str:
    return store.uri(STAGE, "shards", shard_k, "data.parquet")


def _sampling_json(cfg: GenerateConfig) -> str:
    t = cfg.teacher
    return canonical_json(
        {
            "backend": t.backend,
            "model": t.model,
            "prompt": t.prompt,
            "n": t.n,
            "temperature": t.temperature,
            "top_p": t.top_p,
            "max_new_tokens": t.max_new_tokens,
            "seed": t.seed,
            "templates": TEMPLATE_HASH,
        }
    )


# -- one shard ---------------------------------------------------------------------------------


def _retry_errors(
    teacher: Teacher, requests: list[GenRequest], results: list[list[Completion]], n: int
) -> list[list[Completion]]:
    """Regenerate once every request that has an error sample; keep the better sample per slot."""
    failed = [i for i, comps in enumerate(results) if any(c.finish_reason == "error" for c in comps)]
    if not failed:
        return results
    log.info("retrying %d request(s) with errors", len(failed))
    try:
        again = teacher.generate([requests[i] for i in failed], n)
    except Exception as exc:  # a teacher that raises despite the protocol: keep the first errors
        log.warning("retry raised %s", type(exc).__name__)
        return results
    merged = list(results)
    for i, retry in zip(failed, again, strict=False):
        merged[i] = [
            r if c.finish_reason == "error" and r.finish_reason != "error" else c
            for c, r in zip(results[i], _pad(retry, n), strict=True)
        ]
    return merged


def _pad(comps: list[Completion], n: int) -> list[Completion]:
    """A backend that returns fewer than `n` samples gets error rows for the missing ones."""
    comps = list(comps)[:n]
    while len(comps) < n:
        comps.append(Completion("", "error", 0, 0, error="MissingSample: backend returned fewer samples"))
    return comps


def generate_shard(teacher: Teacher, problems: list[dict[str, Any]], cfg: GenerateConfig) -> pa.Table:
    n = cfg.teacher.n
    requests = [GenRequest(p["id"], messages_for(cfg.teacher.prompt, p["question"]), p) for p in problems]
    try:
        results = teacher.generate(requests, n)
    except Exception as exc:  # the protocol says no exceptions; do not trust it with a shard
        log.warning("teacher raised %s on a shard; treating as errors", type(exc).__name__)
        err = f"{type(exc).__name__}: {exc}"[:500]
        results = [[Completion("", "error", 0, 0, error=err)] * n for _ in requests]
    if len(results) != len(requests):
        raise GlyphError(f"teacher returned {len(results)} results for {len(requests)} requests")
    results = [_pad(r, n) for r in results]
    if not all(c.finish_reason == "error" for comps in results for c in comps):
        # Sporadic faults get a second chance; a shard that failed whole (a dead endpoint, whose
        # client already retried each request) would only fail again, twice as slowly.
        results = _retry_errors(teacher, requests, results, n)
    sampling = _sampling_json(cfg)
    name = getattr(teacher, "name", cfg.teacher.backend)
    rows: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for req, comps in zip(requests, results, strict=True):
        prompt = json.dumps(req.messages, ensure_ascii=False)
        for k, c in enumerate(comps):
            rows["id"].append(req.id)
            rows["sample"].append(k)
            rows["prompt"].append(prompt)
            rows["completion"].append(c.text or "")
            rows["finish_reason"].append(c.finish_reason)
            rows["prompt_tokens"].append(int(c.prompt_tokens))
            rows["completion_tokens"].append(int(c.completion_tokens))
            rows["teacher"].append(name)
            rows["sampling"].append(sampling)
            rows["error"].append(c.error)
    return pa.table(rows, schema=SCHEMA)


def _read_shard(store: Store, uri: str, expected_rows: int) -> pa.Table | None:
    """A published shard, or None when it is absent or unreadable (then it is regenerated)."""
    if not store.exists(uri):
        return None
    try:
        table = pq.read_table(io.BytesIO(store.read_bytes(uri)))
    except (StorageError, OSError, pa.ArrowInvalid) as exc:
        log.warning("shard %s unreadable (%s); regenerating", uri, exc)
        return None
    if table.num_rows != expected_rows or table.schema.names != SCHEMA.names:
        log.warning("shard %s has an unexpected shape; regenerating", uri)
        return None
    return table.cast(SCHEMA)


def _publish_shard(store: Store, uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.publish_bytes(uri, buf.getvalue())


def _errors_in(table: pa.Table) -> int:
    return int(pc.sum(pc.equal(table["finish_reason"], "error")).as_py() or 0)


def _merge_retry(table: pa.Table, again: pa.Table) -> pa.Table:
    """`table` with each error row replaced by the retry's row for the same (id, sample) when
    that one succeeded; rows keep their order."""
    fixed = {(r["id"], r["sample"]): r for r in again.to_pylist() if r["finish_reason"] != "error"}
    rows = [
        fixed.get((r["id"], r["sample"]), r) if r["finish_reason"] == "error" else r
        for r in table.to_pylist()
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


class _LazyTeacher:
    """The caller's teacher, or one built from the config on first use (a run whose shards are
    all done and clean never loads a model or probes an endpoint) and closed at the end."""

    def __init__(self, cfg: GenerateConfig, teacher: Teacher | None) -> None:
        self.cfg, self.teacher, self.own = cfg, teacher, teacher is None

    def get(self) -> Teacher:
        if self.teacher is None:
            self.teacher = make_teacher(self.cfg.teacher)
        return self.teacher

    def close(self) -> None:
        if self.own and self.teacher is not None:
            self.teacher.close()


@dataclass
class _ShardRun:
    table: pa.Table
    status: str  # "generated" | "reused" | "repaired"
    seconds: float = 0.0
    tokens: int = 0


def _shard(
    store: Store, shard: list[dict[str, Any]], cfg: GenerateConfig, teacher: _LazyTeacher
) -> _ShardRun:
    """One shard: reused when published and clean, repaired when published with error rows,
    generated otherwise; published again whenever more of it succeeded than before."""
    uri = shard_uri(store, shard_key(shard, cfg))
    table = _read_shard(store, uri, len(shard) * cfg.teacher.n)
    if table is not None and not _errors_in(table):
        return _ShardRun(table, "reused")
    t0 = time.perf_counter()
    if table is None:
        fresh = table = generate_shard(teacher.get(), shard, cfg)
        status = "generated"
        _publish_shard(store, uri, table)
    else:
        failed = set(table.filter(pc.equal(table["finish_reason"], "error"))["id"].to_pylist())
        log.info("shard %s: %d problem(s) with errors from an earlier run; asking again", uri, len(failed))
        fresh = generate_shard(teacher.get(), [p for p in shard if p["id"] in failed], cfg)
        before, table = _errors_in(table), _merge_retry(table, fresh)
        status = "repaired"
        if _errors_in(table) < before:
            _publish_shard(store, uri, table)
    seconds = time.perf_counter() - t0
    return _ShardRun(table, status, seconds, int(pc.sum(fresh["completion_tokens"]).as_py() or 0))


class _ErrorBudget:
    """Counts error completions across shards and fails the stage as soon as the errors so far
    exceed `max_error_rate` of all its completions: from then on, no outcome of the remaining
    shards could make the stage succeed."""

    def __init__(self, cfg: GenerateConfig, total: int) -> None:
        self.cfg, self.total = cfg, total
        self.errors = 0
        self.kinds: Counter[str] = Counter()
        self.first: str | None = None

    def add(self, table: pa.Table) -> None:
        for reason, err in zip(table["finish_reason"].to_pylist(), table["error"].to_pylist(), strict=True):
            if reason == "error":
                self.errors += 1
                self.kinds[error_kind(err)] += 1
                self.first = self.first or err
        if self.errors > self.cfg.max_error_rate * self.total:
            raise self.failure()

    def failure(self) -> ErrorBudgetExceeded:
        t = self.cfg.teacher
        where = f"{t.backend}:{t.model}" + (f" at {t.base_url}" if t.base_url else "")
        kinds = ", ".join(f"{k} x{v}" for k, v in self.kinds.most_common())
        return ErrorBudgetExceeded(
            f"generate: {self.errors} of {self.total} completions failed ({kinds}), more than "
            f"generate.max_error_rate={self.cfg.max_error_rate:g} allows; teacher {where}; "
            f"first error: {(self.first or 'unknown')[:200]}. Nothing was published: fix the teacher "
            "and rerun (completions that succeeded are kept, failed ones are asked again)"
        )


# -- fan-out over several workers ---------------------------------------------------------------


def shard_group(n_shards: int, worker: int, workers: int) -> list[int]:
    """The shard indices worker `worker` of `workers` owns: round robin, so every group gets
    early and late shards alike (the hash order mixes sources, so shards cost about the same)."""
    if workers < 1 or not 0 <= worker < workers:
        raise GlyphError(f"worker {worker} of {workers} is not a valid shard group")
    return list(range(worker, n_shards, workers))


@dataclass
class GroupResult:
    worker: int
    workers: int
    shards: int  # shards in this group
    generated: int
    reused: int
    completion_tokens: int = 0
    generate_s: float = 0.0


def generate_shard_group(
    store: Store,
    problems_ref: DatasetRef,
    cfg: GenerateConfig,
    worker: int,
    workers: int,
    teacher: Teacher | None = None,
) -> GroupResult:
    """Generate the missing shards of one group and publish each as soon as it is done.

    K workers (one per GPU) each call this with their own `worker` index; they share the
    content-addressed shard store, so a later `generate_traces` call finds every shard done and
    only concatenates, and regenerates just the shards a dead worker left unfinished.
    Nothing else is written: the stage's output is the final pass's.
    """
    problems = select_problems(store.read_table(problems_ref), cfg)
    shards = [problems[i : i + cfg.shard_size] for i in range(0, len(problems), cfg.shard_size)]
    mine = shard_group(len(shards), worker, workers)
    out = GroupResult(worker=worker, workers=workers, shards=len(mine), generated=0, reused=0)
    budget = _ErrorBudget(cfg, sum(len(shards[i]) for i in mine) * cfg.teacher.n)
    lazy = _LazyTeacher(cfg, teacher)
    try:
        for i in mine:
            run = _shard(store, shards[i], cfg, lazy)
            if run.status == "reused":
                out.reused += 1
            else:
                out.generated += 1
            out.generate_s += run.seconds
            out.completion_tokens += run.tokens
            budget.add(run.table)
    finally:
        lazy.close()
    log.info("shard group %d/%d: %d generated, %d reused", worker, workers, out.generated, out.reused)
    return out


def group_cfg(cfg: GenerateConfig, worker: int, workers: int, gpus: int | None = None) -> GenerateConfig:
    """The config worker `worker` uses: its own GPU when the transformers backend sees one per
    worker (K threads in one process). `device` is not in any key, so the shards are the same
    as on one device; a worker that sees a single GPU (a pinned child run) keeps the default."""
    if cfg.teacher.backend != "transformers" or cfg.teacher.device is not None:
        return cfg
    if gpus is None:
        import torch  # lazy: only a transformers fan-out needs it, and it is slow to import

        gpus = torch.cuda.device_count()
    if gpus >= workers:
        teacher = cfg.teacher.model_copy(update={"device": f"cuda:{worker}"})
        return cfg.model_copy(update={"teacher": teacher})
    return cfg


def run_group(
    store: Store, cfg: GenerateConfig, *, worker: int, workers: int, problems: DatasetRef
) -> dict[str, Any]:
    """One worker's part of a fanned-out generate stage (the stage's `FanOut.run_group`): the
    missing shards of group `worker` of `workers`, published one by one; returns the counts."""
    return asdict(generate_shard_group(store, problems, group_cfg(cfg, worker, workers), worker, workers))


# -- the stage ---------------------------------------------------------------------------------


def key(cfg: GenerateConfig, *, problems: DatasetRef) -> str:
    """The stage's output key (and its Prefect cache key). The prompt template hash is an input
    next to the problems, because TASK_SOURCE cannot see the templates."""
    inputs = {"problems": problems.sha256, "templates": TEMPLATE_HASH}
    return stage_key(STAGE, VERSION, inputs, cfg.key_dump())


def generate_traces(
    store: Store,
    problems_ref: DatasetRef,
    cfg: GenerateConfig,
    progress: ShardProgress | None = None,
    teacher: Teacher | None = None,
) -> GenerateResult:
    """Generate (or reuse) every shard, then publish the concatenated traces table.

    `teacher` lets a caller pass a teacher it already built (evaluation, tests); it must match
    `cfg.teacher`, which is what the shard keys are computed from. A teacher built here is
    created only when some shard is missing, and closed at the end.
    """
    problems = select_problems(store.read_table(problems_ref), cfg)
    shards = [problems[i : i + cfg.shard_size] for i in range(0, len(problems), cfg.shard_size)]
    budget = _ErrorBudget(cfg, len(problems) * cfg.teacher.n)

    tables: list[pa.Table] = []
    counts: Counter[str] = Counter()
    problems_done = gen_tokens = 0
    gen_seconds = 0.0
    lazy = _LazyTeacher(cfg, teacher)
    try:
        for i, shard in enumerate(shards):
            run = _shard(store, shard, cfg, lazy)
            counts[run.status] += 1
            gen_seconds += run.seconds
            gen_tokens += run.tokens
            budget.add(run.table)  # raises before anything below publishes the stage's output
            tables.append(run.table)
            problems_done += len(shard)
            if progress is not None:
                progress(i + 1, len(shards), problems_done, gen_tokens / gen_seconds if gen_seconds else 0.0)
    finally:
        lazy.close()

    traces = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    ref = store.write_table(traces, STAGE, key(cfg, problems=problems_ref))
    stats = trace_stats(traces, cfg)
    return GenerateResult(
        ref=ref,
        rows=traces.num_rows,
        shards_total=len(shards),
        shards_generated=counts["generated"] + counts["repaired"],
        shards_reused=counts["reused"],
        shards_repaired=counts["repaired"],
        problems=problems_done,
        completion_tokens=gen_tokens,
        generate_s=round(gen_seconds, 3),
        tokens_per_s=round(gen_tokens / gen_seconds, 2) if gen_seconds else 0.0,
        **stats,
    )


def error_kind(error: str | None) -> str:
    """`"APITimeoutError: Request timed out."` -> `"APITimeoutError"`."""
    if not error:
        return "unknown"
    head = error.split(":", 1)[0].strip()
    return head if head and " " not in head else "other"


def trace_stats(traces: pa.Table, cfg: GenerateConfig) -> dict[str, Any]:
    """Counts the run reports (reused shards included): errors by kind, finish reasons,
    empty completions and, for the glyph prompt, completions that break the protocol."""
    reasons = Counter(traces["finish_reason"].to_pylist())
    errors: Counter[str] = Counter()
    empty = invalid = 0
    for text, reason, err in zip(
        traces["completion"].to_pylist(),
        traces["finish_reason"].to_pylist(),
        traces["error"].to_pylist(),
        strict=True,
    ):
        if reason == "error":
            errors[error_kind(err)] += 1
            continue
        if not text.strip():
            empty += 1
        elif cfg.teacher.prompt == "glyph" and validate_trace(text):
            invalid += 1
    return {
        "teachers": dict(Counter(traces["teacher"].to_pylist())),
        "errors": dict(errors),
        "finish_reasons": dict(reasons),
        "empty": empty,
        "invalid_structure": invalid,
    }


def run(
    store: Store,
    cfg: GenerateConfig,
    *,
    problems: DatasetRef,
    progress: Progress | None = None,
) -> StageOutput:
    """Teacher traces for the training problems (sharded and resumable inside `generate_traces`)."""
    timer = Timer()
    out_key = key(cfg, problems=problems)

    def shard_progress(done: int, total: int, *_: Any) -> None:
        if progress is not None:
            progress(done, total)

    result = generate_traces(store, problems, cfg, progress=shard_progress)
    extra: dict[str, Any] = {
        "shards_total": result.shards_total,
        "shards_generated": result.shards_generated,
        "shards_reused": result.shards_reused,
        "shards_repaired": result.shards_repaired,
        "teachers": result.teachers,
        "completion_tokens": result.completion_tokens,
        "tokens_per_s": result.tokens_per_s,
        **{f"error_{k}": v for k, v in result.errors.items()},
    }
    return StageOutput(
        stage=STAGE,
        key=out_key,
        refs={"traces": result.ref},
        stats=StageStats(
            rows_in=result.problems,
            rows_out=result.rows,
            errors=sum(result.errors.values()),
            seconds=timer.seconds,
            extra=extra,
        ),
    )
