"""The pipeline flow: every declared stage in order (docs/design.md, "The pipeline flow").

The wiring is derived from the declarations in `glyph_core/stages.py`: each stage gets the refs
its `inputs` name, from the outputs of the stages before it (checked when the stages are
declared), and its config from the profile. What a stage does lives in `glyph_core`, how it is
cached, retried and sent to the GPU pool in `tasks`. Between stages only small refs travel.

Each stage's task waits for the tasks of the stages whose outputs it reads (`wait_for`), so
Prefect records the dependencies and the UI's run graph draws unify → generate → … → evaluate.

Caching is content-keyed, so a rerun with nothing changed returns every stage `Cached` in
seconds, and a retry of a failed run (same flow-run id) recomputes only the failed stage and
what follows it. `refresh` forces chosen stages *and every later stage* to recompute, because
Prefect has no "restart from task X" and a refreshed stage's consumers should see the rerun.
The GPU stages run on the GPU pool when a GPU deployment is configured (`gpu_pool`, else
`$GLYPH_GPU_DEPLOYMENT`, which the pipeline deployment sets), inline otherwise.

The parameters are typed for the UI's form (docs/ui.md): `profile` is one of the profiles (a
dropdown), `refresh` a list of stage names (a multi-select), both derived from the declarations;
`overrides` is checked on the flow's first line with the same one-line error as `glyph run
--set`. After each stage the flow publishes its artifacts (tasks/artifacts.py), and at the end
the run's summary: as an artifact, and in the store for `glyph report`.
"""

# No `from __future__ import annotations` here: a flow that Prefect loads from its entrypoint
# file and sends to a subprocess is pickled by value, and annotations kept as strings would then
# name types (`ProfileName`, ...) that the pickled function no longer carries.

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BeforeValidator, Field

from glyph_core.outputs import Ref, StageOutput, verify_output
from glyph_core.profiles import PROFILES, PipelineConfig, default_store_root, validate_run
from glyph_core.reports import save_summary
from glyph_core.stages import Stage, names, stages
from glyph_core.storage import Store
from tasks.artifacts import publish_stage, publish_summary, ui_link
from tasks.caching import result_storage_for
from tasks.stages import stage_task_options, task_for

DEFAULT_PROFILE = "demo"
"""What Run in the UI starts with (the deployment takes the flow's default): the real demo, a
small real model on the real data, minutes on a CPU. `tiny` is the tests' random model;
`full` needs GPUs and the Hub."""

if TYPE_CHECKING:  # mypy sees str; Prefect's parameter schema and the UI see the choices
    ProfileName = str
    StageChoice = str
else:
    ProfileName = Literal[PROFILES]
    StageChoice = Literal[(*names(), "all")]


def _none_as(empty: Any) -> BeforeValidator:
    """`None` (what a Python caller passes for "not given") accepted as the empty value, so the
    parameter is typed without `| None`: the UI then offers the input itself, not a type switch."""
    return BeforeValidator(lambda value: empty() if value is None else value)


StoreRoot = Annotated[str, _none_as(str)]
Refresh = Annotated[list[StageChoice], _none_as(list)]
Overrides = Annotated[
    dict[str, Any], _none_as(dict), Field(examples=[{"train.max_steps": 3, "evaluate.per_stratum": 2}])
]
Sources = Annotated[list[str], _none_as(list)]


class _Runner:
    """Runs one stage task with the per-run options, publishes its artifacts, records it."""

    def __init__(self, store: Store, cfg: PipelineConfig, refresh: set[str]) -> None:
        self.store = store
        self.cfg = cfg
        self.refresh = refresh
        self.summary: list[dict[str, Any]] = []
        self.states: dict[str, Any] = {}  # stage name -> its task's final state
        self.headline: list[str] = []
        self.logger = get_run_logger()
        self.result_storage = result_storage_for(store.root)

    def _call(
        self, stage: Stage, refresh: bool, refs: dict[str, Ref], wait_for: list[Any]
    ) -> tuple[StageOutput, bool, Any]:
        options = stage_task_options(
            stage.name,
            self.store.root,
            refresh=refresh,
            retries=self.cfg.retries,
            retry_delay_s=self.cfg.retry_delay_s,
            result_storage=self.result_storage,
        )
        extra = {"gpu_pool": self.cfg.gpu_pool} if stage.gpu else {}
        state: Any = task_for(stage).with_options(**options)(
            store=self.store.root,
            cfg=self.cfg.stage_config(stage.name),
            refs=refs,
            **extra,
            wait_for=wait_for,
            return_state=True,
        )
        out = state.result()  # raises the task's own exception if it failed
        return out, state.name == "Cached", state

    def upstream(self, stage: Stage) -> list[Any]:
        """The states of the stages whose outputs `stage` reads: its edges in the run graph."""
        producers = {s.name for s in stages() for name in stage.inputs if name in s.outputs}
        return [self.states[name] for name in names() if name in producers and name in self.states]

    def run(self, stage: Stage, refs: dict[str, Ref]) -> StageOutput:
        t0 = time.perf_counter()
        wait_for = self.upstream(stage)
        out, cached, state = self._call(stage, stage.name in self.refresh, refs, wait_for)
        if cached and not verify_output(self.store, out):
            # A cache record outlived its artifact (deleted, damaged): never hand that on.
            self.logger.warning("%s: cached artifact missing or damaged; recomputing", stage.name)
            out, cached, state = self._call(stage, True, refs, wait_for)
        self.states[stage.name] = state
        wall = time.perf_counter() - t0
        own = 0.0 if cached else out.stats.seconds
        self.summary.append(
            {
                "stage": stage.name,
                "cached": cached,
                "seconds": round(wall, 3),
                "stage_seconds": round(own, 3),
                "overhead_seconds": round(wall - own, 3),
                "key": out.key,
                "uri": out.ref.uri,
                "refs": {name: ref.uri for name, ref in out.refs.items()},
                "rows_in": out.stats.rows_in,
                "rows_out": out.stats.rows_out,
                "errors": out.stats.errors,
                "drops": out.stats.drops,
            }
        )
        self.logger.info("%s: %s in %.2fs → %s", stage.name, "Cached" if cached else "ran", wall, out.ref.uri)
        report = publish_stage(self.store, out, cached=cached)
        if report is not None and stage.name == names()[-1]:
            self.headline = report.headline  # the last stage's result is the run's result
        return out


def _flow_run_info() -> dict[str, Any]:
    """Id, name and (where Prefect knows the UI's address) the UI page of this flow run."""
    run_id = flow_run.get_id()
    info: dict[str, Any] = {"id": str(run_id) if run_id else None, "name": flow_run.get_name()}
    page = ui_link(f"/runs/flow-run/{run_id}")
    if run_id and "://" in page:
        info["ui_url"] = page
    return info


@flow(name="glyph-pipeline")
def pipeline(
    profile: ProfileName = DEFAULT_PROFILE,
    store: StoreRoot = "",
    refresh: Refresh = [],  # noqa: B006 -- Prefect validates (and copies) parameters per call
    overrides: Overrides = {},  # noqa: B006
    changed_sources: Sources = [],  # noqa: B006
) -> dict[str, Any]:
    """Run every stage; returns refs, cached-or-not and seconds per stage.

    Args:
        profile: `demo` (SmolLM2-135M on the real data, minutes on a CPU), `tiny` (a random
            model, seconds: the tests'), or `full` (Hub data, Qwen2.5-7B, vLLM on GPUs).
        store: a local directory or `s3://bucket/prefix`; empty: `$GLYPH_STORE`, else
            `.glyph/store` in the worker's directory.
        refresh: stages to recompute, with every later stage; `all` for everything.
        overrides: settings on top of the profile, as `glyph run --set` takes them, e.g.
            `{"train.max_steps": 3, "generate.teacher.temperature": 0.2}`: `<stage>.<field>`
            (a field of the stage's config, glyph_core/config.py; `glyph <stage> --help` lists
            them), or `gpu_pool`, `retries`, `retry_delay_s`. Checked before any stage runs.
        changed_sources: set by the dataset trigger: the sources whose data changed.
    """
    t0 = time.perf_counter()
    cfg, chosen = validate_run(profile, overrides, refresh)  # the checks `glyph run` makes
    logger = get_run_logger()
    if changed_sources:
        logger.info("started because these sources changed: %s", ", ".join(changed_sources))
    st = Store(store or default_store_root()).ensure()
    runner = _Runner(st, cfg, chosen)

    refs: dict[str, Ref] = {}  # every output so far, by the name its stage declared
    for stage in stages():
        out = runner.run(stage, {name: refs[name] for name in stage.inputs})
        refs.update(out.refs)

    summary: dict[str, Any] = {
        "profile": profile,
        "store": st.root,
        "overrides": overrides or {},
        "changed_sources": changed_sources or [],
        "seconds": round(time.perf_counter() - t0, 3),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "stages": runner.summary,
        "flow_run": _flow_run_info(),
        "headline": runner.headline,
    }
    publish_summary(summary, runner.headline)
    save_summary(st, summary)
    return summary
