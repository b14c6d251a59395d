"""GPU stages as their own flows, and the helper that sends a stage to them (DESIGN §5).

generate, train and evaluate are deployed on the `gpu` work pool (deployments/prefect.yaml) as
the flows `glyph-generate`, `glyph-train` and `glyph-evaluate`. Each takes the store root, the
input refs and the stage config as parameters (JSON-able pydantic models, editable in the UI)
and calls the same `glyph_core.stages.run_<stage>` function the pipeline's tasks call inline.

`dispatch_or_inline(stage, store, **inputs)` is what a pipeline task calls in its body:

- without a GPU deployment configured it runs `run_<stage>` in the task's own process;
- with `GLYPH_GPU_DEPLOYMENT=<name>` in the environment (the pipeline deployment sets it in its
  job variables, so it can be changed per run in the UI) it creates a run of
  `glyph-<stage>/<name>` with `run_deployment(..., timeout=0)` and waits for it.

Because the call happens inside the task, the task's cache covers it: a retry or rerun of the
parent whose task comes back Cached never dispatches again.

How the result comes back: the child writes its `StageOutput` as JSON to the store at
`{root}/_runs/{child flow run id}/{stage}.json` (a known key) and the parent reads it from there
once the child is Completed. This needs no Prefect result storage shared between the machines,
only the store both already share (S3 once more than one host is involved), and a person can
read the file. The refs inside are content-addressed, and the parent verifies them before use.

Reattaching: each child is tagged `glyph-dispatch-<hash>` (hash of the parent flow run id, the
stage and its parameters). Before dispatching, the parent looks for a child with that tag that
is Completed or still scheduled/running (for example, the parent process died while its child
trained on and the parent was then retried) and waits for that one instead of starting a second
GPU job. Failed and Cancelled children are never reused: a retry dispatches a fresh one.

Crashes: a child killed from outside (OOM killer, preempted node) ends Crashed, and flow retries
do not cover Crashed. The automation in deployments/automations.yaml reschedules crashed runs on
the `gpu` pool (same flow run id), so the parent, seeing Crashed, waits up to
`GLYPH_CRASH_GRACE_S` (default 120 s) for the run to leave that state before giving up. A child
refuses to start after `GLYPH_GPU_MAX_RUNS` (default 3) runs, which ends it Failed, not
Crashed, so a run that is killed every time is not rescheduled forever.

Fault injection for tests: when `GLYPH_FAULT_DIR` is set in a GPU worker's environment, a
stage flow that finds `{dir}/{stage}.fail` deletes it and raises, and one that finds
`{dir}/{stage}.crash` deletes it and SIGKILLs its own process (as the OOM killer would). Each
armed file fires once. Nothing happens without the variable.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext, TaskRunContext
from pydantic import BaseModel

from glyph_core.config import EvalConfig, GenerateConfig, TrainConfig
from glyph_core.errors import GlyphError
from glyph_core.stages import GPU_STAGES, RUNNERS, StageOutput
from glyph_core.storage import DatasetRef, ModelRef, Store, canonical_json

ENV_DEPLOYMENT = "GLYPH_GPU_DEPLOYMENT"
RESULT_DIR = "_runs"
TAG = "glyph-gpu-stage"


class StageRunFailed(GlyphError):
    """The GPU stage's own flow run ended Failed, Cancelled or Crashed for good.

    A `GlyphError`, so the calling task does not retry it on its own: the child already had its
    chance, and a person decides (Retry in the UI dispatches a fresh child run).
    """


class StageRunCrashed(RuntimeError):
    """The child stayed Crashed past the grace period (no automation rescheduled it).

    Not a `GlyphError`: a task retry dispatches a fresh child, which is what a crash calls for.
    """


def flow_name(stage: str) -> str:
    return f"glyph-{stage}"


def configured_deployment(deployment: str | None = None) -> str | None:
    """The GPU deployment name to dispatch to, or None to run inline."""
    value = deployment if deployment is not None else os.environ.get(ENV_DEPLOYMENT, "")
    value = value.strip()
    return None if value.lower() in ("", "0", "false", "no", "inline", "none") else value


def result_uri(store: Store, flow_run_id: Any, stage: str) -> str:
    return store.uri(RESULT_DIR, str(flow_run_id), f"{stage}.json")


# ---------------------------------------------------------------------------------------------
# the child side: one flow per GPU stage


def _inject_fault(stage: str) -> None:
    fault_dir = os.environ.get("GLYPH_FAULT_DIR")
    if not fault_dir:
        return
    for kind in ("fail", "crash"):
        armed = Path(fault_dir) / f"{stage}.{kind}"
        try:
            armed.unlink()  # consumed: fires once
        except FileNotFoundError:
            continue
        get_run_logger().warning("GLYPH_FAULT_DIR: injecting a %s into %s", kind, stage)
        if kind == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure in {stage} ({armed})")


def _check_run_count(stage: str) -> None:
    from prefect.runtime import flow_run

    limit = int(os.environ.get("GLYPH_GPU_MAX_RUNS", "3"))
    count = int(flow_run.run_count or 1)
    if count > limit:
        raise StageRunFailed(
            f"{stage}: this flow run has started {count} times (crashed and rescheduled); "
            f"giving up after GLYPH_GPU_MAX_RUNS={limit}"
        )


def _progress_reporter(stage: str):
    """A `progress(done, total)` callback that keeps a Prefect progress artifact up to date."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    state: dict[str, Any] = {"id": None, "last": 0.0}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        pct = 100.0 * done / total if total else 100.0
        if state["id"] is None:
            state["id"] = create_progress_artifact(pct, description=f"{stage} progress")
        elif now - state["last"] >= 2.0 or done >= total:
            update_progress_artifact(state["id"], pct)
        state["last"] = now

    return progress


def run_stage_here(stage: str, store: str, **inputs: Any) -> StageOutput:
    """The body of every GPU stage flow: run the stage, publish its output at the known key."""
    logger = get_run_logger()
    _check_run_count(stage)
    _inject_fault(stage)
    st = Store(store)
    runner = RUNNERS[stage]
    if "progress" in inspect.signature(runner).parameters:
        inputs["progress"] = _progress_reporter(stage)
    out = runner(st, **inputs)
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        uri = result_uri(st, ctx.flow_run.id, stage)
        st.publish_bytes(uri, out.model_dump_json(indent=2).encode())
        logger.info("%s: %s -> %s (result %s)", stage, out.key, out.ref.uri, uri)
    return out


# Children must not retry by themselves: a GPU stage resumes from its own shards/checkpoints, and
# whether to spend more GPU time is the parent's (or a person's) decision.
@flow(name=flow_name("generate"), retries=0)
def generate_flow(
    store: str, problems: DatasetRef, cfg: GenerateConfig, shard_group: list[int] | None = None
) -> StageOutput | dict[str, Any]:
    """Teacher traces for the training problems, on the GPU pool.

    With `shard_group=[worker, workers]` (the fan-out in flows/fanout.py) it only generates
    that group's missing shards and returns their counts; the final pass concatenates."""
    if shard_group is not None:
        from flows.fanout import run_group_here

        return run_group_here(store, problems, cfg, shard_group)
    return run_stage_here("generate", store, problems=problems, cfg=cfg)


@flow(name=flow_name("train"), retries=0)
def train_flow(store: str, sft: DatasetRef, cfg: TrainConfig) -> StageOutput:
    """Fine-tune the student on the SFT rows, on the GPU pool."""
    return run_stage_here("train", store, sft=sft, cfg=cfg)


@flow(name=flow_name("evaluate"), retries=0)
def evaluate_flow(store: str, problems: DatasetRef, model: ModelRef, cfg: EvalConfig) -> StageOutput:
    """Base against tuned on the held-out problems, on the GPU pool."""
    return run_stage_here("evaluate", store, problems=problems, model=model, cfg=cfg)


STAGE_FLOWS = {"generate": generate_flow, "train": train_flow, "evaluate": evaluate_flow}


# ---------------------------------------------------------------------------------------------
# the parent side


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _parent_ids() -> tuple[str, str | None]:
    """(parent flow run id, its UI-facing name) of the calling run, or a fresh id outside one."""
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return str(ctx.flow_run.id), ctx.flow_run.name
    task_ctx = TaskRunContext.get()
    if task_ctx is not None and task_ctx.task_run.flow_run_id is not None:
        return str(task_ctx.task_run.flow_run_id), None
    return uuid.uuid4().hex, None


def dispatch_tag(parent_id: str, stage: str, parameters: dict[str, Any]) -> str:
    digest = hashlib.sha256(canonical_json([parent_id, stage, parameters]).encode()).hexdigest()
    return f"glyph-dispatch-{digest[:16]}"


def _existing_child(client: Any, tag: str) -> Any | None:
    """A child with this tag that is Completed or still on its way (never a Failed one)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=20,
    )
    for run in runs:
        state = run.state
        if state is None:
            continue
        if state.is_completed() or not state.is_final():
            return run
    return None


def wait_for_child(
    flow_run_id: Any, *, poll_s: float | None = None, crash_grace_s: float | None = None, logger: Any = None
) -> Any:
    """Poll a child flow run until Completed; raise if it ends otherwise.

    Crashed is not final here for `crash_grace_s`: the automation may reschedule the run.
    """
    from prefect import get_client

    poll_s = poll_s if poll_s is not None else float(os.environ.get("GLYPH_DISPATCH_POLL_S", "2"))
    crash_grace_s = (
        crash_grace_s if crash_grace_s is not None else float(os.environ.get("GLYPH_CRASH_GRACE_S", "120"))
    )
    crashed_since: float | None = None
    last_name = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            if state is not None and state.name != last_name:
                if logger:
                    logger.info("child %s (%s): %s", run.name, flow_run_id, state.name)
                last_name = state.name
            if state is None or not state.is_final():
                crashed_since = None
            elif state.is_completed():
                return run
            elif state.is_crashed():
                crashed_since = crashed_since or time.monotonic()
                if time.monotonic() - crashed_since > crash_grace_s:
                    raise StageRunCrashed(
                        f"GPU stage run {run.name} ({flow_run_id}) Crashed and was not rescheduled "
                        f"within {crash_grace_s:.0f} s: {state.message}"
                    )
            else:
                raise StageRunFailed(
                    f"GPU stage run {run.name} ({flow_run_id}) ended {state.name}: {state.message}"
                )
            time.sleep(poll_s)


def dispatch(stage: str, store: Store, deployment: str, **inputs: Any) -> StageOutput:
    """Run `stage` as a flow run of `glyph-<stage>/<deployment>` and return its output."""
    from prefect import get_client, get_run_logger
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    parameters = {"store": store.root, **{k: _jsonable(v) for k, v in inputs.items()}}
    parent_id, parent_name = _parent_ids()
    tag = dispatch_tag(parent_id, stage, parameters)
    name = f"{flow_name(stage)}/{deployment}"

    child: Any
    with get_client(sync_client=True) as client:
        child = _existing_child(client, tag)
    if child is not None:
        logger.info("%s: reattaching to %s (%s), %s", stage, child.name, child.id, child.state.name)
    else:
        child = run_deployment(  # type: ignore[assignment]  # sync call: a FlowRun, not a coroutine
            name,
            parameters=parameters,
            timeout=0,
            tags=[TAG, f"glyph-stage-{stage}", tag],
            flow_run_name=f"{stage} <- {parent_name}" if parent_name else None,
        )
        logger.info("%s: dispatched %s as %s (%s)", stage, name, child.name, child.id)
    wait_for_child(child.id, logger=logger)
    out = StageOutput.model_validate(store.read_json(result_uri(store, child.id, stage)))
    for ref in out.refs.values():
        store.verify(ref)  # the parent trusts only what it can check
    return out


def dispatch_or_inline(
    stage: str, store: Store, *, deployment: str | None = None, progress: Any = None, **inputs: Any
) -> StageOutput:
    """Run a GPU stage on the configured GPU deployment, else inline (same function either way).

    `inputs` are the keyword arguments of `glyph_core.stages.run_<stage>` after `store`
    (`problems`, `sft`, `model`, `cfg`); call it from the stage's task body.
    """
    if stage not in GPU_STAGES:
        raise ValueError(f"{stage!r} is not a GPU stage ({', '.join(sorted(GPU_STAGES))})")
    cfg = inputs.get("cfg")
    if stage == "generate" and isinstance(cfg, GenerateConfig) and cfg.workers > 1:
        from flows.fanout import fan_out_generate  # K shard groups, then this call with workers=1

        return fan_out_generate(store, deployment=deployment, progress=progress, **inputs)
    target = configured_deployment(deployment)
    if target is None:
        runner = RUNNERS[stage]
        if progress is not None and "progress" in inspect.signature(runner).parameters:
            inputs["progress"] = progress
        return runner(store, **inputs)
    return dispatch(stage, store, target, **inputs)
