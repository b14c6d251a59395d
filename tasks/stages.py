"""The Prefect task of every declared stage, built by one factory (docs/design.md, "Layers").

`task_for(stage)` wraps the stage's runner with what orchestration adds and nothing else: the
cache policy keyed on the stage's own key, JSON result persistence, retries of transient errors,
the progress artifact, the stage's log lines in the run log, and where it runs
(`tasks.dispatch.execute`: here, or on the GPU pool). The stage's result artifacts are published
by the flow once the task has finished (`tasks.artifacts.publish_stage`), Cached or not: a task
that comes back Cached never runs its body, and a result already computed must not be failed
by an API call about it. A task takes only the store URI (a string), the stage config and a
dict of input refs: an unhashable input (a client, a model) would silently disable caching.
`stage_task_options` gives the per-run options that depend on the store (result storage, lock
directory) and on `refresh`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from prefect import Task, task

from glyph_core.config import StrictModel
from glyph_core.outputs import Ref, StageOutput
from glyph_core.stages import Stage
from glyph_core.storage import Store
from tasks.artifacts import ProgressArtifact
from tasks.caching import lock_dir_for, result_storage_for, retry_options, stage_policy
from tasks.dispatch import execute
from tasks.runlog import relay_stage_logs


def run_stage_task(
    stage: Stage, store: str, cfg: StrictModel, refs: dict[str, Ref], gpu_pool: str | None = None
) -> StageOutput:
    """The body of every stage task: run the stage where it belongs, its progress in an artifact.

    `gpu_pool` None lets `$GLYPH_GPU_DEPLOYMENT` decide; "inline" forces this process.
    """
    relay_stage_logs()
    return execute(stage, Store(store), cfg, refs, deployment=gpu_pool, progress=ProgressArtifact(stage.name))


@functools.cache
def task_for(stage: Stage) -> Task[..., StageOutput]:
    """The Prefect task named after `stage` (one per declaration, built once)."""

    def body(store: str, cfg: StrictModel, refs: dict[str, Ref], gpu_pool: str | None = None) -> StageOutput:
        return run_stage_task(stage, store, cfg, refs, gpu_pool)

    # Prefect derives the task key from the function's name: one per stage, not one for all.
    body.__name__ = body.__qualname__ = f"{stage.name}_task"
    decorator = task(
        name=stage.name, cache_policy=stage_policy(stage.name), persist_result=True, result_serializer="json"
    )
    # Defaults for a task called without `stage_task_options` (the flow always passes those).
    return decorator(body).with_options(**retry_options(2, 2.0))


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
