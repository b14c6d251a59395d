"""The GPU stages as their own flows, one per stage declared with `gpu=True` (docs/design.md,
"GPU stages"): `glyph-generate`, `glyph-train` and `glyph-evaluate`, deployed on the `gpu` work
pool (deployments/prefect.yaml). This is the child side only; the parent side (starting,
reattaching, waiting) is in tasks/dispatch.py and tasks/children.py.

Each flow is derived from its stage's declaration: its parameters are the store root, the
stage's input refs (typed as the runner declares them) and its config, so they are JSON-able
pydantic models, editable in the UI; a stage with a fan-out also takes `group=[worker, K]`, and
then does only that group's part. The body runs the same `Stage.run` the pipeline's tasks run
inline, and publishes the `StageOutput` at the known key the parent reads; then the stage's
artifacts in the child run as the pipeline publishes them in its own (tasks/artifacts.py: the
stage's artifact, `glyph-evaluation` for evaluate, the training metrics and loss curve for
train), with the stage's log lines and result headline in the child run's log.

Children never retry by themselves: a GPU stage resumes from its own shards or checkpoints, and
whether to spend more GPU time is the parent's (or a person's) decision. A child refuses to
start after `GLYPH_GPU_MAX_RUNS` (default 3) runs, which ends it Failed, not Crashed, so a run
that is killed every time is not rescheduled forever by the crash automation.
"""

from __future__ import annotations

import inspect
import json
import os
import typing
from typing import Any

from prefect import Flow, flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from glyph_core.config import StrictModel
from glyph_core.outputs import StageOutput
from glyph_core.stages import Stage, stages
from glyph_core.storage import Store
from tasks.artifacts import ProgressArtifact, publish_stage
from tasks.children import StageRunFailed, flow_name, result_uri
from tasks.dispatch import group_result_name, run_here
from tasks.faults import inject_fault
from tasks.runlog import relay_stage_logs


def _check_run_count(stage: str) -> None:
    limit = int(os.environ.get("GLYPH_GPU_MAX_RUNS", "3"))
    count = int(flow_run.run_count or 1)
    if count > limit:
        raise StageRunFailed(
            f"{stage}: this flow run has started {count} times (crashed and rescheduled); "
            f"giving up after GLYPH_GPU_MAX_RUNS={limit}"
        )


def run_child(
    stage: Stage, store: str, cfg: StrictModel, refs: dict[str, Any], group: list[int] | None = None
) -> StageOutput | dict[str, Any]:
    """The body of every GPU stage flow: run the stage (or one fan-out group of it) and publish
    the result where the parent reads it."""
    logger = get_run_logger()
    relay_stage_logs()
    _check_run_count(stage.name)
    st = Store(store)
    ctx = FlowRunContext.get()
    run_id = ctx.flow_run.id if ctx is not None and ctx.flow_run is not None else None
    if group is not None:
        if stage.fan_out is None:
            raise StageRunFailed(f"{stage.name} declares no fan-out; `group` is not a parameter of it")
        worker, workers = group
        inject_fault(stage.name)
        counts = stage.fan_out.run_group(st, cfg, worker=worker, workers=workers, **refs)
        if run_id is not None:
            st.publish_bytes(
                result_uri(st, run_id, group_result_name(stage.name, worker)),
                json.dumps(counts, indent=2).encode(),
            )
        return counts
    out = run_here(stage, st, cfg, refs, ProgressArtifact(stage.name))
    if run_id is not None:
        uri = result_uri(st, run_id, stage.name)
        st.publish_bytes(uri, out.model_dump_json(indent=2).encode())
        logger.info("%s: %s -> %s (result %s)", stage.name, out.key, out.ref.uri, uri)
    publish_stage(st, out)  # best effort: a lost artifact never fails a finished GPU stage
    return out


def child_flow(stage: Stage) -> Flow[..., Any]:
    """The flow `glyph-<stage>` with parameters `store`, the stage's input refs, `cfg` (and
    `group` for a fan-out stage), typed from the stage's runner so the UI builds a form."""
    hints = typing.get_type_hints(stage.run)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("store", kind, annotation=str)]
    params += [inspect.Parameter(name, kind, annotation=hints[name]) for name in stage.inputs]
    params.append(inspect.Parameter("cfg", kind, annotation=stage.config))
    if stage.fan_out is not None:
        params.append(inspect.Parameter("group", kind, default=None, annotation=list[int] | None))
    signature = inspect.Signature(params, return_annotation=dict[str, Any])

    def body(*args: Any, **kwargs: Any) -> StageOutput | dict[str, Any]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        refs = {name: values[name] for name in stage.inputs}
        return run_child(stage, values["store"], values["cfg"], refs, values.get("group"))

    # Prefect reads the parameters (validation, the UI form, the deployment's schema) from this.
    body.__signature__ = signature  # type: ignore[attr-defined]
    body.__annotations__ = {p.name: p.annotation for p in params}
    body.__name__ = body.__qualname__ = f"{stage.name}_flow"
    body.__doc__ = f"{stage.help} (the `{stage.name}` stage on the GPU pool)"
    return flow(name=flow_name(stage.name), retries=0, description=body.__doc__)(body)


STAGE_FLOWS: dict[str, Flow[..., Any]] = {s.name: child_flow(s) for s in stages() if s.gpu}

# The deployment entrypoints (deployments/prefect.yaml) name these module attributes.
generate_flow = STAGE_FLOWS["generate"]
train_flow = STAGE_FLOWS["train"]
evaluate_flow = STAGE_FLOWS["evaluate"]
