"""Where a stage runs: here, or as a child flow run on the GPU pool; and a fan-out over several
workers first where the stage declares one (docs/design.md, "GPU stages" and "Fan-out").

`execute` is what a stage's task calls in its body. Because the call happens inside the task,
the task's cache covers it: a retry or rerun of the parent whose task comes back Cached never
dispatches again.

- A CPU stage, or a GPU stage without a GPU deployment configured, runs in the task's own
  process (`run_here`).
- A GPU stage with a deployment configured (`GLYPH_GPU_DEPLOYMENT=<name>` in the environment,
  which the pipeline deployment sets in its job variables, or the pipeline config's `gpu_pool`)
  runs as a flow run of `glyph-<stage>/<name>` (`dispatch`): the parent waits for it and reads
  its `StageOutput` back from the store (tasks/children.py).
- A stage that declares a `FanOut` and is configured with K > 1 workers first has its K groups
  done at once (K threads here, or K child runs with `group=[worker, K]`), then runs as above
  with one worker: that final pass finds every group's work done and only assembles the output.
  A worker that died loses only its unfinished part, which the final pass redoes, so the
  fan-out never fails for one worker.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from glyph_core.config import StrictModel
from glyph_core.outputs import Progress, Ref, StageOutput
from glyph_core.stages import FanOut, Stage
from glyph_core.storage import Store
from tasks.children import (
    Child,
    StageRunCrashed,
    StageRunFailed,
    jsonable,
    result_uri,
    start_children,
    wait_for_child,
)
from tasks.faults import inject_fault, record_execution
from tasks.runlog import run_logger

ENV_DEPLOYMENT = "GLYPH_GPU_DEPLOYMENT"
ENV_GPUS = "GLYPH_FANOUT_GPUS"

INLINE_GPU = threading.Lock()
"""One GPU stage at a time in this process. Inline, the process is the GPU pool: pipelines run
side by side (a sweep's points, flows/sweep.py) share CPU stages freely, but two trainings or two
vLLM engines at once would compete for the GPU's memory, and torch's global RNG would make each
training depend on the other's timing. Taken inside the stage's task, after its cache lock, and
released before anything else waits, so it cannot deadlock with the cache's locks."""


def configured_deployment(deployment: str | None = None) -> str | None:
    """The GPU deployment name to dispatch to, or None to run inline."""
    value = deployment if deployment is not None else os.environ.get(ENV_DEPLOYMENT, "")
    value = value.strip()
    return None if value.lower() in ("", "0", "false", "no", "inline", "none") else value


def run_here(
    stage: Stage, store: Store, cfg: StrictModel, refs: dict[str, Ref], progress: Progress | None = None
) -> StageOutput:
    """Run the stage in this process: where the test hooks count executions and inject faults."""
    record_execution(stage.name)
    inject_fault(stage.name)
    return stage.run_with(store, cfg, refs, progress)


def child_parameters(stage: Stage, store: Store, cfg: StrictModel, refs: dict[str, Ref]) -> dict[str, Any]:
    """The parameters of the stage's child flow (flows/gpu_stages.py): the store, its input refs
    and its config, as JSON."""
    return {
        "store": store.root,
        **{name: jsonable(refs[name]) for name in stage.inputs},
        "cfg": jsonable(cfg),
    }


def dispatch(
    stage: Stage, store: Store, deployment: str, cfg: StrictModel, refs: dict[str, Ref]
) -> StageOutput:
    """Run `stage` as a flow run of `glyph-<stage>/<deployment>` and return its output."""
    logger = run_logger()
    (child,) = start_children(
        stage.name, deployment, [Child(child_parameters(stage, store, cfg, refs))], logger=logger
    )
    wait_for_child(child.id, logger=logger)
    out = StageOutput.model_validate(store.read_json(result_uri(store, child.id, stage.name)))
    for ref in out.refs.values():
        store.verify(ref)  # the parent trusts only what it can check
    return out


# ---------------------------------------------------------------------------------------------
# fan-out


def pinned_gpu(worker: int) -> dict[str, Any] | None:
    """Job variables that pin child `worker` to one GPU, when `GLYPH_FANOUT_GPUS` lists the
    GPU ids (`0,1,2,3`): then one process worker with `--limit N` on the GPU host is enough.
    Unset, the children inherit the deployment's job variables (one Prefect worker per GPU,
    each started with its own `CUDA_VISIBLE_DEVICES`, and none set in the deployment)."""
    gpus = [g.strip() for g in os.environ.get(ENV_GPUS, "").split(",") if g.strip()]
    if not gpus:
        return None
    return {
        "env": {
            "CUDA_VISIBLE_DEVICES": gpus[worker % len(gpus)],
            "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        }
    }


def group_result_name(stage: str, worker: int) -> str:
    return f"{stage}-group-{worker}"


def run_groups(
    stage: Stage, fan_out: FanOut, store: Store, cfg: StrictModel, refs: dict[str, Ref], target: str | None
) -> list[dict[str, Any] | None]:
    """Every group of a fanned-out stage at once; a lost group is None (the final pass redoes it)."""
    k = fan_out.workers(cfg)
    inputs = {name: refs[name] for name in stage.inputs}
    logger = run_logger()
    if target is None:

        def one(worker: int) -> dict[str, Any] | None:
            try:
                return fan_out.run_group(store, cfg, worker=worker, workers=k, **inputs)
            except Exception as exc:  # the final pass redoes this group's missing work
                logger.warning(
                    "%s group %d/%d failed (%s: %s)", stage.name, worker, k, type(exc).__name__, exc
                )
                return None

        with ThreadPoolExecutor(max_workers=k, thread_name_prefix=f"glyph-{stage.name}") as pool:
            return list(pool.map(one, range(k)))

    params = child_parameters(stage, store, cfg, refs)
    children = [
        Child(
            {**params, "group": [w, k]},
            label=f"group {w + 1}/{k}",
            tags=(f"glyph-group-{w}-of-{k}",),
            job_variables=pinned_gpu(w),
        )
        for w in range(k)
    ]
    results: list[dict[str, Any] | None] = []
    for w, child in enumerate(start_children(stage.name, target, children, logger=logger)):
        try:
            wait_for_child(child.id, logger=logger)
            results.append(store.read_json(result_uri(store, child.id, group_result_name(stage.name, w))))
        except (StageRunFailed, StageRunCrashed) as exc:
            logger.warning("%s group %d/%d lost (%s); the final pass fills it in", stage.name, w, k, exc)
            results.append(None)
    return results


def fan_out_stats(workers: int, groups: list[dict[str, Any] | None]) -> dict[str, Any]:
    """`workers`, `groups_lost`, and each count the groups returned, summed (`groups_<name>`)."""
    stats: dict[str, Any] = {"workers": workers, "groups_lost": sum(g is None for g in groups)}
    for group in groups:
        for name, value in (group or {}).items():
            if name not in ("worker", "workers") and isinstance(value, int | float):
                stats[f"groups_{name}"] = stats.get(f"groups_{name}", 0) + value
    return stats


# ---------------------------------------------------------------------------------------------


def execute(
    stage: Stage,
    store: Store,
    cfg: StrictModel,
    refs: dict[str, Ref],
    *,
    deployment: str | None = None,
    progress: Progress | None = None,
) -> StageOutput:
    """Run `stage` where it belongs (see the module docstring) and return its output."""
    target = configured_deployment(deployment) if stage.gpu else None
    groups: list[dict[str, Any] | None] = []
    fan_out = stage.fan_out
    workers = fan_out.workers(cfg) if fan_out is not None else 1
    # Inline, this process is the GPU: the lock covers the fan-out's groups and the final pass.
    with INLINE_GPU if stage.gpu and target is None else contextlib.nullcontext():
        if fan_out is not None and workers > 1:
            groups = run_groups(stage, fan_out, store, cfg, refs, target)
            cfg = fan_out.final_pass(cfg)  # not in the key: same output, same key
        if target is None:
            out = run_here(stage, store, cfg, refs, progress)
        else:
            out = dispatch(stage, store, target, cfg, refs)
    if groups:
        out.stats.extra.update(fan_out_stats(workers, groups))
    return out
