"""One Prefect task per stage. Each calls `glyph_core.stages.run_<stage>` and adds only
orchestration: the cache policy, JSON result persistence, retries, and artifacts.

The tasks take only the store URI (a string), refs and configs: unhashable inputs (clients,
models) would silently disable caching (DESIGN §4). `stage_task_options` gives the per-run
options that depend on the store (result storage, lock directory) and on `refresh`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from glyph_core.config import (
    EvalConfig,
    FilterConfig,
    GenerateConfig,
    RewriteConfig,
    TrainConfig,
    UnifyConfig,
)
from glyph_core.stages import GPU_STAGES, RUNNERS, StageOutput
from glyph_core.storage import DatasetRef, ModelRef, Store
from tasks.caching import (
    lock_dir_for,
    maybe_inject_failure,
    record_execution,
    result_storage_for,
    retry_options,
    stage_policy,
)

# Defaults for a task called without `stage_task_options` (the flow always passes those).
_COMMON: dict[str, Any] = {"persist_result": True, "result_serializer": "json", **retry_options(2, 2.0)}


class ProgressArtifact:
    """A progress artifact for a long stage, updated at most once a second (each update is an
    API call) and always at the end."""

    def __init__(self, stage: str, every_s: float = 1.0) -> None:
        self.stage = stage
        self.every_s = every_s
        self.artifact_id: Any = None
        self.last = 0.0

    def __call__(self, done: int, total: int, *_: Any) -> None:
        pct = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=pct, key=f"glyph-{self.stage}-progress", description=f"{self.stage}: {done}/{total}"
            )
            self.last = now
        elif now - self.last >= self.every_s or done >= total:
            update_progress_artifact(
                self.artifact_id, progress=pct, description=f"{self.stage}: {done}/{total}"
            )
            self.last = now


def _publish_artifacts(store: Store, out: StageOutput) -> None:
    """A table (rows in/out, drops by reason, seconds), a link to the main output and a list of
    every ref: what a person looks for in the UI when a stage ran."""
    s = out.stats
    row = {
        "stage": out.stage,
        "rows_in": s.rows_in,
        "rows_out": s.rows_out,
        "seconds": round(s.seconds, 3),
        **{f"drop_{k}": v for k, v in s.drops.items()},
    }
    create_table_artifact(
        key=f"glyph-{out.stage}",
        table=[row],
        description=f"{out.stage} (key {out.key}): rows in/out, drops by reason, seconds",
    )
    main = out.ref
    create_link_artifact(
        key=f"glyph-{out.stage}-output",
        link=store.link(main.uri),
        link_text=main.uri,
        description=f"{out.stage} output, sha256 {main.sha256[:12]}",
    )
    lines = [
        f"### {out.stage} → `{store.link(main.uri)}`",
        "",
        "| name | uri | sha256 | rows |",
        "|---|---|---|---|",
    ]
    for name, ref in out.refs.items():
        rows = ref.rows if isinstance(ref, DatasetRef) else ref.kind
        lines.append(f"| {name} | `{ref.uri}` | `{ref.sha256[:16]}` | {rows} |")
    if s.extra:
        lines += ["", "```", *(f"{k}: {v}" for k, v in s.extra.items()), "```"]
    create_markdown_artifact(markdown="\n".join(lines), description=f"{out.stage} outputs")


def _execute(
    stage: str, store_uri: str, progress: bool = False, gpu_pool: str | None = None, **inputs: Any
) -> StageOutput:
    record_execution(stage)
    maybe_inject_failure(stage)
    store = Store(store_uri)
    if progress:
        inputs["progress"] = ProgressArtifact(stage)
    if stage in GPU_STAGES:
        # Inline, or a flow run of glyph-<stage>/<deployment> on the GPU pool (issue 6), inside
        # the task: a Cached task never dispatches again.
        from flows.gpu_stages import dispatch_or_inline

        out = dispatch_or_inline(stage, store, deployment=gpu_pool, **inputs)
    else:
        out = RUNNERS[stage](store, **inputs)
    _publish_artifacts(store, out)
    return out


@task(name="unify", cache_policy=stage_policy("unify"), **_COMMON)
def unify_task(store: str, cfg: UnifyConfig) -> StageOutput:
    return _execute("unify", store, cfg=cfg)


@task(name="generate", cache_policy=stage_policy("generate"), **_COMMON)
def generate_task(
    store: str, problems: DatasetRef, cfg: GenerateConfig, gpu_pool: str | None = None
) -> StageOutput:
    return _execute("generate", store, progress=True, gpu_pool=gpu_pool, problems=problems, cfg=cfg)


@task(name="filter", cache_policy=stage_policy("filter"), **_COMMON)
def filter_task(store: str, traces: DatasetRef, problems: DatasetRef, cfg: FilterConfig) -> StageOutput:
    return _execute("filter", store, traces=traces, problems=problems, cfg=cfg)


@task(name="rewrite", cache_policy=stage_policy("rewrite"), **_COMMON)
def rewrite_task(store: str, kept: DatasetRef, problems: DatasetRef, cfg: RewriteConfig) -> StageOutput:
    return _execute("rewrite", store, kept=kept, problems=problems, cfg=cfg)


@task(name="train", cache_policy=stage_policy("train"), **_COMMON)
def train_task(store: str, sft: DatasetRef, cfg: TrainConfig, gpu_pool: str | None = None) -> StageOutput:
    return _execute("train", store, progress=True, gpu_pool=gpu_pool, sft=sft, cfg=cfg)


@task(name="evaluate", cache_policy=stage_policy("evaluate"), **_COMMON)
def evaluate_task(
    store: str, problems: DatasetRef, model: ModelRef, cfg: EvalConfig, gpu_pool: str | None = None
) -> StageOutput:
    return _execute("evaluate", store, gpu_pool=gpu_pool, problems=problems, model=model, cfg=cfg)


STAGE_TASKS: dict[str, Task[..., StageOutput]] = {
    "unify": unify_task,
    "generate": generate_task,
    "filter": filter_task,
    "rewrite": rewrite_task,
    "train": train_task,
    "evaluate": evaluate_task,
}


def stage_task_options(
    stage: str,
    store_root: str,
    refresh: bool = False,
    retries: int = 2,
    retry_delay_s: float = 2.0,
    result_storage: Path | str | None = None,
) -> dict[str, Any]:
    """Per-run task options: result storage and locks under this store, refresh, retries.

    Pass `result_storage` (from `result_storage_for`) when calling this for several stages, so
    an object store's block is saved once per run rather than once per stage.
    """
    return {
        "cache_policy": stage_policy(stage, lock_dir_for(store_root)),
        "result_storage": result_storage if result_storage is not None else result_storage_for(store_root),
        "refresh_cache": refresh,
        **retry_options(retries, retry_delay_s),
    }
