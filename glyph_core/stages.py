"""Ref in, ref out: the thin glue between the table-level stage functions and the store.

Each `run_<stage>` reads its input `DatasetRef`s, calls the stage's own function, writes the
output under `{root}/{stage}/{key}/` and returns a `StageOutput`: the refs and the stats a
person wants to see (rows in and out, drops by reason, seconds). Nothing here imports Prefect;
the Prefect tasks in `tasks/` call these functions and add caching, retries and artifacts.

Why the key functions live here: the Prefect cache key (`tasks.caching.StageCachePolicy`) and
the artifact location must be the *same* key, so both call `stage_key_for`, which in turn
delegates to a stage module's own key function where that module publishes by itself (train,
generate, evaluate write their artifacts directly and resume from them).

What enters a key (DESIGN §4): the stage name, an explicit version (bump it when a stage's code
changes what it writes — Prefect's TASK_SOURCE sees only the task body, not this module), the
sha256 of every input ref (never its path), the prompt templates' hash where prompts are used,
and the stage config's `key_dump()` (speed-only fields excluded). For unify, whose inputs are
source files rather than refs, the input is a fingerprint of those files' bytes, so the same
data at another path hits the same key.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from glyph_core.config import (
    EvalConfig,
    FilterConfig,
    GenerateConfig,
    RewriteConfig,
    TrainConfig,
    UnifyConfig,
)
from glyph_core.errors import GlyphError
from glyph_core.prompts import TEMPLATE_HASH
from glyph_core.storage import DatasetRef, ModelRef, Store, stage_key

STAGES: tuple[str, ...] = ("unify", "generate", "filter", "rewrite", "train", "evaluate")
GPU_STAGES: frozenset[str] = frozenset({"generate", "train", "evaluate"})

# Bump a stage's version whenever this glue changes what that stage writes.
VERSIONS: dict[str, str] = {"unify": "1", "filter": "1", "rewrite": "1"}
"""Versions of the stages whose key is computed here; generate, train and evaluate version
their own keys (`glyph_core.<stage>.VERSION`)."""

Progress = Callable[[int, int], None]
"""`progress(done, total)`: called by long stages (generate shards, train steps)."""


class SourcesRef(BaseModel):
    """The content of unify's inputs: a hash over the bytes of every source file (or, for the
    Hub, over the dataset ids and pinned revisions). It plays the part a `DatasetRef` plays for
    the other stages, so unify's cache key never depends on where the files are."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    data_dir: str | None
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")


class StageStats(BaseModel):
    rows_in: int = 0
    rows_out: int = 0
    drops: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = Field(default_factory=dict)


class StageOutput(BaseModel):
    """What a stage hands to the next one (and what Prefect persists as its JSON result)."""

    stage: str
    key: str
    refs: dict[str, DatasetRef | ModelRef]
    stats: StageStats

    @property
    def ref(self) -> DatasetRef | ModelRef:
        """The main output (the first ref)."""
        return next(iter(self.refs.values()))


# ---------------------------------------------------------------------------------------------
# source fingerprints

_FILE_SHA: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file, memoised on (path, mtime, size): the cache policy and the stage both
    fingerprint the sources in one run, and hashing 27 MB twice is waste."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if memo not in _FILE_SHA:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _FILE_SHA[memo] = h.hexdigest()
    return _FILE_SHA[memo]


def fingerprint_sources(cfg: UnifyConfig) -> SourcesRef:
    """Hash every file under `{data_dir}/{source}/` for the configured sources.

    The whole source folder is hashed, not only the files today's loader opens, so a loader
    that starts reading another file can never serve a stale cache (a spurious rerun costs
    seconds; a stale one costs a wrong result).
    """
    if cfg.data_dir is None:
        from glyph_core import sources

        hub = getattr(sources, "HUB_SOURCES", {})
        desc = {
            name: [getattr(hub.get(name), "hub_id", None), getattr(hub.get(name), "revision", None)]
            for name in [*cfg.sources, "math500"]
        }
        sha = hashlib.sha256(repr(sorted(desc.items())).encode()).hexdigest()
        return SourcesRef(sha256=sha, data_dir=None, files={k: str(v) for k, v in desc.items()})
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise GlyphError(f"data directory not found: {root}")
    files: dict[str, str] = {}
    for name in cfg.sources:
        folder = root / name
        if not folder.is_dir():
            raise GlyphError(f"{folder}: source folder missing for {name!r}")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            files[path.relative_to(root).as_posix()] = _file_sha256(path)
    sha = hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(files.items())).encode()).hexdigest()
    return SourcesRef(sha256=sha, data_dir=str(root.resolve()), files=files)


# ---------------------------------------------------------------------------------------------
# keys


def _unify_config_key(cfg: UnifyConfig) -> dict[str, Any]:
    dump = cfg.key_dump()
    dump.pop("data_dir", None)  # where the files are is not what they are: the fingerprint is
    return dump


def stage_key_for(stage: str, inputs: Mapping[str, Any]) -> str:
    """The key of `stage` for these task inputs (refs and config; other values are ignored).

    Used by the Prefect cache policy before the stage runs and by `run_<stage>` to choose the
    artifact location, so the two always agree. Stages whose module publishes by itself
    (generate, train, evaluate) own their key function; this delegates to it.
    """
    cfg = inputs["cfg"]
    if stage == "unify":
        return stage_key(
            "unify", VERSIONS["unify"], {"sources": fingerprint_sources(cfg).sha256}, _unify_config_key(cfg)
        )
    if stage == "generate":
        from glyph_core.generate import generate_key

        return generate_key(inputs["problems"], cfg)
    if stage == "train":
        from glyph_core.train import train_key

        return train_key(inputs["sft"], cfg)
    if stage == "evaluate":
        from glyph_core.evaluate import evaluate_key

        return evaluate_key(inputs["problems"], inputs["model"], cfg)
    if stage not in VERSIONS:
        raise GlyphError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    hashes = {name: v.sha256 for name, v in sorted(inputs.items()) if isinstance(v, DatasetRef | ModelRef)}
    if stage == "rewrite":
        hashes["templates"] = TEMPLATE_HASH  # the latent prompt is written into every SFT row
    return stage_key(stage, VERSIONS[stage], hashes, cfg.key_dump())


# ---------------------------------------------------------------------------------------------
# stages


def _count(table: pa.Table, column: str) -> dict[str, int]:
    if column not in table.column_names:
        return {}
    out: dict[str, int] = {}
    for value in table.column(column).to_pylist():
        out[str(value)] = out.get(str(value), 0) + 1
    return dict(sorted(out.items()))


def run_unify(store: Store, cfg: UnifyConfig) -> StageOutput:
    """Load and unify the sources into the problems table."""
    from glyph_core.unify import unify

    t0 = time.perf_counter()
    key = stage_key_for("unify", {"cfg": cfg})
    result = unify(cfg)
    ref = store.write_table(result.table, "unify", key, "problems.parquet")
    drops = {k: v for k, v in result.dropped.items() if v}
    rows_in = result.table.num_rows + sum(result.dropped.values())
    extra = {"splits": _count(result.table, "split"), "buckets": _count(result.table, "bucket")}
    return StageOutput(
        stage="unify",
        key=key,
        refs={"problems": ref},
        stats=StageStats(
            rows_in=rows_in, rows_out=ref.rows, drops=drops, seconds=time.perf_counter() - t0, extra=extra
        ),
    )


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def run_generate(
    store: Store, problems: DatasetRef, cfg: GenerateConfig, progress: Progress | None = None
) -> StageOutput:
    """Teacher traces for the training problems (sharded and resumable inside `generate`)."""
    from glyph_core.generate import generate_traces

    t0 = time.perf_counter()
    key = stage_key_for("generate", {"problems": problems, "cfg": cfg})
    shard_progress = None
    if progress is not None:

        def shard_progress(done: int, total: int, *_: Any) -> None:
            progress(done, total)

    result = generate_traces(store, problems, cfg, progress=shard_progress)
    if result.ref.uri != store.uri("generate", key, "data.parquet"):
        raise GlyphError(f"generate wrote {result.ref.uri}, not under its key {key}: keys disagree")
    extra: dict[str, Any] = {
        "shards_total": result.shards_total,
        "shards_generated": result.shards_generated,
        "shards_reused": result.shards_reused,
        "completion_tokens": result.completion_tokens,
        "tokens_per_s": result.tokens_per_s,
        **{f"error_{k}": v for k, v in result.errors.items()},
    }
    return StageOutput(
        stage="generate",
        key=key,
        refs={"traces": result.ref},
        stats=StageStats(
            rows_in=result.problems, rows_out=result.rows, seconds=time.perf_counter() - t0, extra=extra
        ),
    )


def run_filter(store: Store, traces: DatasetRef, problems: DatasetRef, cfg: FilterConfig) -> StageOutput:
    """Keep the traces with a correct answer and a valid structure; record every drop by reason."""
    from glyph_core.filter import filter_traces

    t0 = time.perf_counter()
    key = stage_key_for("filter", {"traces": traces, "problems": problems, "cfg": cfg})
    result = filter_traces(store.read_table(traces), store.read_table(problems), cfg)
    kept = store.write_table(result.kept, "filter", key, "kept.parquet")
    drops_ref = store.write_table(result.drops, "filter", key, "drops.parquet")
    return StageOutput(
        stage="filter",
        key=key,
        refs={"kept": kept, "drops": drops_ref},
        stats=StageStats(
            rows_in=traces.rows,
            rows_out=kept.rows,
            drops={k: int(v) for k, v in result.drop_counts().items()},
            seconds=time.perf_counter() - t0,
        ),
    )


def run_rewrite(store: Store, kept: DatasetRef, problems: DatasetRef, cfg: RewriteConfig) -> StageOutput:
    """SFT rows: latent prompt → glyph trace for hard problems, → natural answer for easy ones."""
    from glyph_core.rewrite import rewrite

    t0 = time.perf_counter()
    key = stage_key_for("rewrite", {"kept": kept, "problems": problems, "cfg": cfg})
    result = rewrite(store.read_table(kept), store.read_table(problems), cfg)
    ref = store.write_table(result.table, "rewrite", key, "sft.parquet")
    return StageOutput(
        stage="rewrite",
        key=key,
        refs={"sft": ref},
        stats=StageStats(
            rows_in=kept.rows,
            rows_out=ref.rows,
            seconds=time.perf_counter() - t0,
            extra={"kinds": _count(result.table, "kind"), **dict(result.stats)},
        ),
    )


def run_train(
    store: Store, sft: DatasetRef, cfg: TrainConfig, progress: Progress | None = None
) -> StageOutput:
    """Fine-tune the student; the model directory is published with its manifest last."""
    from glyph_core import train

    t0 = time.perf_counter()
    key = stage_key_for("train", {"sft": sft, "cfg": cfg})
    kwargs: dict[str, Any] = {}
    if progress is not None and _accepts(train.run_train, "progress"):
        kwargs["progress"] = progress
    model = train.run_train(store, sft, cfg, **kwargs)
    refs: dict[str, DatasetRef | ModelRef] = {"model": model}
    extra: dict[str, Any] = {"kind": model.kind, "base_model": model.base_model}
    metrics_uri = store.uri("train", key, "metrics.parquet")
    if store.exists(metrics_uri):
        refs["metrics"] = _ref_of(store, metrics_uri)
    return StageOutput(
        stage="train",
        key=key,
        refs=refs,
        stats=StageStats(rows_in=sft.rows, rows_out=1, seconds=time.perf_counter() - t0, extra=extra),
    )


def _ref_of(store: Store, uri: str) -> DatasetRef:
    """A ref to a Parquet file a stage module published by itself (hash and row count read back)."""
    import io

    import pyarrow.parquet as pq

    data = store.read_bytes(uri)
    rows = int(pq.ParquetFile(io.BytesIO(data)).metadata.num_rows)
    return DatasetRef(uri=uri, sha256=hashlib.sha256(data).hexdigest(), rows=rows)


def run_evaluate(store: Store, problems: DatasetRef, model: ModelRef, cfg: EvalConfig) -> StageOutput:
    """Base against tuned on the held-out problems: emergence, structure, accuracy, selectivity."""
    from glyph_core.evaluate import run_evaluate as evaluate

    t0 = time.perf_counter()
    key = stage_key_for("evaluate", {"problems": problems, "model": model, "cfg": cfg})
    result = evaluate(store, problems, model, cfg)
    refs: dict[str, DatasetRef | ModelRef] = {
        "table": _ref_of(store, result.paths["table"]),
        "completions": _ref_of(store, result.paths["completions"]),
    }
    extra: dict[str, Any] = {k: v for k, v in result.paths.items() if k not in ("table", "completions")}
    for name, value in result.metrics.items():
        if isinstance(value, int | float | str) and len(extra) < 40:
            extra[name] = value
    return StageOutput(
        stage="evaluate",
        key=key,
        refs=refs,
        stats=StageStats(
            rows_in=problems.rows,
            rows_out=result.completions.num_rows,
            seconds=time.perf_counter() - t0,
            extra=extra,
        ),
    )


RUNNERS: dict[str, Callable[..., StageOutput]] = {
    "unify": run_unify,
    "generate": run_generate,
    "filter": run_filter,
    "rewrite": run_rewrite,
    "train": run_train,
    "evaluate": run_evaluate,
}


def verify_output(store: Store, out: StageOutput) -> bool:
    """Is every artifact a (cached) output names still there and intact?

    A cache record outlives its artifact if someone deletes or damages the artifact; a later
    run must not hand the next stage a ref to nothing. Tables are checked by hash (the next
    stage reads them anyway); models by their manifest and the presence of every file, since
    hashing many gigabytes of weights on every cached run would cost more than it protects
    (`get_dir` verifies every file's hash when the model is loaded).
    """
    try:
        for ref in out.refs.values():
            if isinstance(ref, ModelRef):
                store.check_model(ref)
            else:
                store.verify(ref)
    except Exception:
        return False
    return True


def default_store_root() -> str:
    """`$GLYPH_STORE`, else `./.glyph/store` (git-ignored): embedded, nothing to start."""
    return os.environ.get("GLYPH_STORE") or str(Path(".glyph") / "store")
