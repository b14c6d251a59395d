"""The sweep flow: one pipeline run per grid point, then one comparison (docs/sweep.md).

The plan, the record and the comparison live in `glyph_core/sweep.py` (no Prefect); this flow
runs the points and publishes the result:

- **Points are child runs of the sweep.** Each point is a task (`sweep-point`, named after the
  point) whose child is the point's pipeline run: inline, the pipeline flow called as a subflow;
  deployed (`pipeline_deployment="default"`), a run of `glyph-pipeline/default` started with
  `run_deployment` as a subflow of the task (tasks/children.py: a retried sweep reattaches to a
  point run that completed or is still running instead of starting it again). Either way the UI
  shows the sweep with its points under it, and each point's stages under the point.
- **Concurrency.** At most `max_parallel` points are in flight (a thread pool of that size;
  with 1, the points run one after the other in the flow's own thread).
  Inline, CPU stages of different points run side by side while GPU stages take turns
  (`tasks.dispatch.INLINE_GPU`); deployed, the pipeline deployment's concurrency limit and the
  `gpu` pool's own limit decide (deployments/prefect.yaml). Two points that need the same stage
  at the same time compute it once: the stage cache's SERIALIZABLE lock makes the second wait
  and then read the first one's result.
- **Failure.** A failed point does not stop the others. The comparison is published over the
  points that completed, the record lists the failed ones with their error, and then the sweep
  ends Failed. Running the sweep again recomputes only what failed or changed: every stage a
  completed point ran comes back Cached.
- **What it publishes.** The record and the rendered comparison under
  `{store}/_sweeps/{sweep flow-run id}/` (`sweep.json`, `table.md`, `frontier.png`; found again
  by id, by flow-run name or as `last`), and two keyed artifacts: `glyph-sweep` (the table, the
  best point and its rule, the frontier embedded as a PNG data URI) and `glyph-sweep-table`.
"""

# No `from __future__ import annotations` here: a flow that Prefect loads from its entrypoint
# file and sends to a subprocess is pickled by value, and annotations kept as strings would then
# name types (`ProfileName`, ...) that the pickled function no longer carries.

import contextvars
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.transactions import Transaction

from flows.pipeline import DEFAULT_PROFILE, ProfileName, Refresh, StoreRoot, pipeline
from glyph_core.errors import GlyphError
from glyph_core.profiles import default_store_root
from glyph_core.reports import png_data_url, summary_uri
from glyph_core.storage import Store
from glyph_core.sweep import (
    Point,
    SweepError,
    comparison_markdown,
    load_metrics,
    plan_sweep,
    point_outcome,
    render,
    save_sweep,
    sweep_record,
    table_rows,
)
from tasks.artifacts import best_effort
from tasks.children import Child, start_children, wait_for_child

POINT_TAG = "glyph-sweep-point"


class SweepIncomplete(GlyphError):
    """Some points failed; the others completed and their comparison is published."""


def literal(name: str) -> Callable[[], str]:
    """A run name Prefect uses as it is: a string is a format template to it, and a point's
    label may hold braces (`glyph_min_bucket_by_source={"math":"hard"}`)."""
    return lambda: name


def outside_transactions(fn: Any, /, **kwargs: Any) -> Any:
    """Call `fn` (here: the pipeline as a subflow of a point task) with no Prefect transaction
    active, keeping every other context (the flow and task run, so the subflow is still the
    point's child).

    Why: a task's own transaction becomes the parent of every task transaction opened inside it,
    even in a subflow. A stage task then leaves committing, and so releasing its SERIALIZABLE
    cache lock, to that parent: the point would hold the lock of every stage it ran or read
    until the whole point ended (serialising the points), and if the point failed, its rollback
    skips children already committed, so their locks would never be released and every later
    point would wait on them for ever (the same nesting as Prefect issue #18600). Without a
    parent, each stage commits and releases its lock when it ends, as in `glyph run`."""
    ctx = contextvars.copy_context()

    def call() -> Any:
        Transaction.__var__.set(None)  # type: ignore[arg-type]
        return fn(**kwargs)

    return ctx.run(call)


@task(name="sweep-point", cache_policy=NO_CACHE, persist_result=False)
def run_point(
    title: str,
    profile: str,
    store: str,
    overrides: dict[str, Any],
    refresh: list[str],
    pipeline_deployment: str | None,
) -> dict[str, Any]:
    """One point: its pipeline run, here or through the deployment; returns the run's id, name
    and summary, or raises that run's own error."""
    if pipeline_deployment is None:
        state: Any = outside_transactions(
            pipeline.with_options(flow_run_name=literal(title)),
            profile=profile,
            store=store,
            refresh=refresh,
            overrides=overrides,
            return_state=True,
        )
        summary = state.result()  # the point's own exception if it failed
        return {
            "flow_run_id": str(state.state_details.flow_run_id),
            "flow_run_name": title,
            "summary": summary,
        }
    logger = get_run_logger()
    params = {"profile": profile, "store": store, "refresh": refresh, "overrides": overrides}
    (child,) = start_children(
        "pipeline",
        pipeline_deployment,
        [Child(params, label=title, tags=(POINT_TAG,))],
        logger=logger,
        kind_tag=POINT_TAG,
    )
    run = wait_for_child(child.id, logger=logger)
    st = Store(store)
    return {
        "flow_run_id": str(child.id),
        "flow_run_name": run.name,
        "summary": st.read_json(summary_uri(st, child.id)),
    }


def _error(state: Any) -> str:
    try:
        state.result()
    except Exception as exc:  # the point's own error, for the record and the table
        return f"{type(exc).__name__}: {exc}"
    return f"ended {state.name}"


@flow(name="glyph-sweep")
def sweep(
    profile: ProfileName = DEFAULT_PROFILE,
    store: StoreRoot = "",
    sets: dict[str, Any] | None = None,
    grid: dict[str, list[Any]] | None = None,
    points: list[dict[str, Any]] | None = None,
    refresh: Refresh = [],  # noqa: B006 -- Prefect validates (and copies) parameters per call
    max_parallel: int = 2,
    pipeline_deployment: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run one pipeline per point and compare them.

    Args:
        profile: the base profile of every point (`tiny`, `demo`, `full`).
        store: a local directory or `s3://bucket/prefix`; default `$GLYPH_STORE` or `.glyph/store`.
        sets: dotted settings for every point, e.g. `{"unify.max_train_per_source": 300}`.
        grid: dotted setting -> values; every combination is a point, e.g. `{"train.epochs": [3, 6]}`.
        points: explicit points (dotted settings, optional `name`), each combined with the grid.
        refresh: stages every point recomputes, with every later stage.
        max_parallel: points in flight at once.
        pipeline_deployment: run each point as a run of `glyph-pipeline/<this>` (e.g. `default`);
            None runs them as subflows in this process.
        command: the command line that started the sweep, kept in its record.
    """
    if max_parallel < 1:
        raise SweepError(f"max_parallel={max_parallel}: must be >= 1")
    plan = plan_sweep(profile, sets, grid, points)  # every point's config, before anything runs
    st = Store(store or default_store_root()).ensure()
    logger = get_run_logger()
    logger.info("sweep of %d points: %s", len(plan.points), ", ".join(p.name for p in plan.points))

    def title(p: Point) -> str:
        return f"{p.name}: {p.label(plan.swept)}"

    def params(p: Point) -> dict[str, Any]:
        return {
            "title": title(p),
            "profile": profile,
            "store": st.root,
            "overrides": plan.overrides(p),
            "refresh": list(refresh),
            "pipeline_deployment": pipeline_deployment,
        }

    def point_task(p: Point) -> Any:
        return run_point.with_options(task_run_name=literal(title(p)))

    states: list[Any]
    if max_parallel == 1:  # one after the other in this thread (where GPU libraries expect to be)
        states = [point_task(p)(**params(p), return_state=True) for p in plan.points]
    else:
        runner: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner(max_workers=max_parallel)
        with runner:
            futures = [runner.submit(point_task(p), params(p)) for p in plan.points]
            for f in futures:
                f.wait()
            states = [f.state for f in futures]

    outcomes = []
    for p, state in zip(plan.points, states, strict=True):
        if state.is_completed():
            res = state.result()
            outcomes.append(
                point_outcome(
                    p,
                    state="completed",
                    flow_run_id=res["flow_run_id"],
                    flow_run_name=res["flow_run_name"],
                    summary=res["summary"],
                    store=st,
                )
            )
        else:
            error = _error(state)
            logger.error("point %s failed: %s", p.name, error)
            outcomes.append(point_outcome(p, state="failed", error=error))

    record = sweep_record(
        plan,
        outcomes,
        sweep_id=str(flow_run.id),
        name=flow_run.name,
        store=st.root,
        refresh=refresh,
        command=command,
    )
    metrics = load_metrics(record, st)
    markdown, png, rows, best = render(record, metrics)
    uri = save_sweep(st, record, {"table.md": markdown.encode(), "frontier.png": png})
    best_effort(  # the record is safe in the store; the UI's copy must not fail the sweep
        "sweep artifacts",
        lambda: (
            create_markdown_artifact(
                key="glyph-sweep",
                markdown=comparison_markdown(record, rows, best, png_data_url(png)),
                description=f"sweep {record['name']}: {len(plan.points)} points, best {best.get('point')}",
            ),
            create_table_artifact(
                key="glyph-sweep-table",
                table=table_rows(rows, plan.swept),
                description=f"sweep {record['name']}, one row per point (tuned model). {best['rule']}",
            ),
        ),
    )
    logger.info("sweep record: %s; best point: %s (%s)", uri, best.get("point"), best["why"])
    failed = [o["name"] for o in outcomes if o["state"] != "completed"]
    if failed:
        raise SweepIncomplete(
            f"{len(failed)} of {len(outcomes)} points failed ({', '.join(failed)}); the comparison "
            f"of the others is in {uri}; run the sweep again to recompute only what failed"
        )
    return {"id": record["id"], "name": record["name"], "record": uri, "best": best.get("point")}
