"""Child flow runs on the GPU pool: start (or reattach to) them, wait for them, read their
result (docs/design.md, "GPU stages"). The one way this code base starts child runs: the GPU
dispatch and the fan-out both come here.

How a result comes back: the child writes it as JSON to the store at
`{root}/_runs/{child flow run id}/{name}.json` (a known key; `result_uri`), and the parent reads
it once the child is Completed. That needs no Prefect result storage shared between machines,
only the store both already share (S3 once more than one host is involved), and a person can
read the file. Refs inside are content-addressed; the parent verifies them before use.

Reattaching: each child is tagged `glyph-dispatch-<hash>` (hash of the parent flow run id, the
stage and the child's parameters). Before starting one, the parent looks for a child with that
tag that is Completed or still scheduled/running (say the parent process died while its child
trained on, and the parent was retried) and waits for that one instead of starting a second
GPU job. Failed and Cancelled children are never reused: a retry starts a fresh one.

Where a child shows in the parent's run graph: under the task that started it. Prefect's
`run_deployment` links a child through a placeholder task run in the parent, keyed by the
parent flow run and a per-process call count; a retried parent (same flow run id, a new
process, the count back at 0) therefore got the *first* attempt's placeholder, and the new
child hung under the old, failed task. `start_children` creates the placeholder itself, keyed
by the calling task run (`link_task_run`), so every attempt's child hangs under that
attempt's task; the flow run itself is created the way `run_deployment` creates it.

Crashes: a child killed from outside (OOM killer, preempted node) ends Crashed, and flow
retries do not cover Crashed. The automation in deployments/automations.yaml reschedules
crashed runs on the `gpu` pool (same flow run id), so the parent, seeing Crashed, waits up to
`GLYPH_CRASH_GRACE_S` (default 120 s) for the run to leave that state before giving up.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from prefect import Task, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import TaskRunResult
from prefect.client.schemas.sorting import FlowRunSort
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import Pending, Scheduled
from pydantic import BaseModel

from glyph_core.errors import GlyphError
from glyph_core.storage import Store, canonical_json

RESULT_DIR = "_runs"
TAG = "glyph-gpu-stage"


class StageRunFailed(GlyphError):
    """The stage's child flow run ended Failed, Cancelled or Crashed for good.

    A `GlyphError`, so the calling task does not retry it on its own: the child already had its
    chance, and a person decides (Retry in the UI dispatches a fresh child run).
    """


class StageRunCrashed(RuntimeError):
    """The child stayed Crashed past the grace period (no automation rescheduled it).

    Not a `GlyphError`: a task retry dispatches a fresh child, which is what a crash calls for.
    """


def flow_name(stage: str) -> str:
    """The name of a stage's child flow (`glyph-<stage>`), deployed as `glyph-<stage>/<name>`."""
    return f"glyph-{stage}"


def result_uri(store: Store, flow_run_id: Any, name: str) -> str:
    return store.uri(RESULT_DIR, str(flow_run_id), f"{name}.json")


def jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def parent_ids() -> tuple[str, str | None]:
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


def existing_child(client: Any, tag: str) -> Any | None:
    """A child with this tag that is Completed or still on its way (never a Failed one)."""
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


@dataclass
class Child:
    """One child run to start: its parameters, and how it shows in the UI and where it runs."""

    parameters: dict[str, Any]
    label: str = ""
    """Added to the run name, e.g. `group 2/4`."""
    tags: tuple[str, ...] = ()
    job_variables: dict[str, Any] | None = None
    """Overrides of the deployment's job variables (e.g. the GPU the child is pinned to)."""


def _placeholder() -> None:
    """The body of a link task run: never called (the child flow run does the work)."""


def link_task_run(client: Any, deployment: str, index: int) -> Any | None:
    """A task run in the calling flow run, inside the calling task, for a child to hang under
    (its `parent_task_run_id`); None outside a task run (the child is then a plain flow run).

    Keyed by the calling task run and the child's index, so a retried parent's new task gets a
    new link; the server mirrors the child's states onto it, as for `run_deployment`'s own.
    """
    ctx = TaskRunContext.get()
    if ctx is None or ctx.task_run.flow_run_id is None:
        return None
    link = Task(name=deployment, fn=_placeholder)
    link.task_key = f"glyph.dispatch.{deployment.replace('/', '.')}"
    run = client.create_task_run(
        task=link,
        flow_run_id=ctx.task_run.flow_run_id,
        dynamic_key=f"{ctx.task_run.id}-{index}",
        task_inputs={"__parents__": [TaskRunResult(id=ctx.task_run.id)]},
        state=Pending(),
    )
    return run.id


def start_children(
    stage: str, deployment: str, children: list[Child], *, logger: Any, kind_tag: str = TAG
) -> list[Any]:
    """A run of `glyph-<stage>/<deployment>` per child, or the live or completed run that a
    previous attempt of this parent started with the same parameters (see "Reattaching").

    `stage` names the child flow (`glyph-pipeline` for a sweep's points, flows/sweep.py) and
    `kind_tag` says what kind of child it is in the UI (a GPU stage unless told otherwise)."""
    parent_id, parent_name = parent_ids()
    name = f"{flow_name(stage)}/{deployment}"
    runs: list[Any] = []
    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(name)
        for index, child in enumerate(children):
            what = f"{stage} {child.label}".strip()
            tag = dispatch_tag(parent_id, stage, child.parameters)
            run: Any = existing_child(client, tag)
            if run is not None:
                logger.info("%s: reattaching to %s (%s)", what, run.name, run.id)
            else:
                run = client.create_flow_run_from_deployment(
                    target.id,
                    parameters=child.parameters,
                    state=Scheduled(),
                    name=f"{what} <- {parent_name}" if parent_name else None,
                    tags=[kind_tag, f"glyph-stage-{stage}", *child.tags, tag],
                    parent_task_run_id=link_task_run(client, name, index),
                    job_variables=child.job_variables,
                )
                logger.info("%s: dispatched %s as %s (%s)", what, name, run.name, run.id)
            runs.append(run)
    return runs


def wait_for_child(
    flow_run_id: Any, *, poll_s: float | None = None, crash_grace_s: float | None = None, logger: Any = None
) -> Any:
    """Poll a child flow run until Completed; raise if it ends otherwise.

    Crashed is not final here for `crash_grace_s`: the automation may reschedule the run.
    """
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
                        f"child run {run.name} ({flow_run_id}) Crashed and was not rescheduled "
                        f"within {crash_grace_s:.0f} s: {state.message}"
                    )
            else:
                raise StageRunFailed(
                    f"child run {run.name} ({flow_run_id}) ended {state.name}: {state.message}"
                )
            time.sleep(poll_s)
