"""The pipeline flow: unify → generate → filter → rewrite → train → evaluate (DESIGN §2–§5).

The flow only composes the stage tasks of `tasks.stages`; what a stage does lives in
`glyph_core`, how it is cached and retried in `tasks`. Between stages only small refs travel.

Caching is content-keyed, so a rerun with nothing changed returns every stage `Cached` in
seconds, and a retry of a failed run (same flow-run id) recomputes only the failed stage and
what follows it. `refresh` forces chosen stages *and every later stage* to recompute, because
Prefect has no "restart from task X" and a refreshed stage's consumers should see the rerun.

GPU seam (issue 6): `generate`, `train` and `evaluate` go through `_dispatch`. When
`gpu_pool` is configured they are meant to run as their own flow runs on that work pool via
`run_deployment` inside a cached task; today they always run inline.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from glyph_core.errors import GlyphError
from glyph_core.profiles import PipelineConfig, load_profile
from glyph_core.stages import GPU_STAGES, STAGES, StageOutput, default_store_root, verify_output
from glyph_core.storage import Store
from tasks.caching import result_storage_for
from tasks.stages import STAGE_TASKS, stage_task_options


def refresh_set(refresh: list[str] | None) -> set[str]:
    """The named stages and every stage after the earliest of them (`all` = every stage)."""
    names = [r.strip() for r in (refresh or []) if r.strip()]
    if not names:
        return set()
    if "all" in names:
        return set(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise GlyphError(f"unknown stage(s) in refresh: {', '.join(unknown)}; expected {', '.join(STAGES)}")
    first = min(STAGES.index(n) for n in names)
    return set(STAGES[first:])


class _Runner:
    """Runs one stage task with the per-run options and records what happened."""

    def __init__(self, store: Store, cfg: PipelineConfig, refresh: set[str]) -> None:
        self.store = store
        self.cfg = cfg
        self.refresh = refresh
        self.summary: list[dict[str, Any]] = []
        self.logger = get_run_logger()
        self.result_storage = result_storage_for(store.root)

    def _call(self, stage: str, refresh: bool, inputs: dict[str, Any]) -> tuple[StageOutput, bool]:
        options = stage_task_options(
            stage,
            self.store.root,
            refresh=refresh,
            retries=self.cfg.retries,
            retry_delay_s=self.cfg.retry_delay_s,
            result_storage=self.result_storage,
        )
        task = STAGE_TASKS[stage].with_options(**options)
        state = task(store=self.store.root, **inputs, return_state=True)
        out = state.result()  # raises the task's own exception if it failed
        return out, state.name == "Cached"

    def run(self, stage: str, **inputs: Any) -> StageOutput:
        t0 = time.perf_counter()
        out, cached = self._dispatch(stage, stage in self.refresh, inputs)
        if cached and not verify_output(self.store, out):
            # A cache record outlived its artifact (deleted, damaged): never hand that on.
            self.logger.warning("%s: cached artifact missing or damaged; recomputing", stage)
            out, cached = self._dispatch(stage, True, inputs)
        wall = time.perf_counter() - t0
        own = 0.0 if cached else out.stats.seconds
        self.summary.append(
            {
                "stage": stage,
                "cached": cached,
                "seconds": round(wall, 3),
                "stage_seconds": round(own, 3),
                "overhead_seconds": round(wall - own, 3),
                "key": out.key,
                "uri": out.ref.uri,
                "refs": {name: ref.uri for name, ref in out.refs.items()},
                "rows_in": out.stats.rows_in,
                "rows_out": out.stats.rows_out,
                "drops": out.stats.drops,
            }
        )
        self.logger.info("%s: %s in %.2fs → %s", stage, "Cached" if cached else "ran", wall, out.ref.uri)
        return out

    def _dispatch(self, stage: str, refresh: bool, inputs: dict[str, Any]) -> tuple[StageOutput, bool]:
        if stage in GPU_STAGES:
            # gpu_pool None: $GLYPH_GPU_DEPLOYMENT decides (the deployment sets it); "inline" runs
            # here. See flows/gpu_stages.py.
            inputs = {**inputs, "gpu_pool": self.cfg.gpu_pool}
        return self._call(stage, refresh, inputs)


@flow(name="glyph-pipeline")
def pipeline(
    profile: str = "tiny",
    store: str | None = None,
    refresh: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every stage; returns refs, cached-or-not and seconds per stage.

    Args:
        profile: `tiny` (tests), `demo` (SmolLM2-135M on CPU) or `full` (Hub data, Qwen2.5-7B, vLLM).
        store: a local directory or `s3://bucket/prefix`; default `$GLYPH_STORE` or `.glyph/store`.
        refresh: stages to recompute, with every later stage; `["all"]` for everything.
        overrides: dotted settings, e.g. `{"train.max_steps": 3, "generate.teacher.temperature": 0.2}`.
    """
    t0 = time.perf_counter()
    cfg = load_profile(profile, overrides or {})
    st = Store(store or default_store_root()).ensure()
    runner = _Runner(st, cfg, refresh_set(refresh))

    unify = runner.run("unify", cfg=cfg.unify)
    problems = unify.refs["problems"]
    generate = runner.run("generate", problems=problems, cfg=cfg.generate)
    filtered = runner.run("filter", traces=generate.refs["traces"], problems=problems, cfg=cfg.filter)
    rewrite = runner.run("rewrite", kept=filtered.refs["kept"], problems=problems, cfg=cfg.rewrite)
    train = runner.run("train", sft=rewrite.refs["sft"], cfg=cfg.train)
    runner.run("evaluate", problems=problems, model=train.refs["model"], cfg=cfg.evaluate)

    create_table_artifact(
        key="glyph-pipeline-summary",
        table=[{k: v for k, v in row.items() if k not in ("refs", "drops")} for row in runner.summary],
        description=f"profile {profile} on {st.root}: cached or not, seconds per stage",
    )
    return {
        "profile": profile,
        "store": st.root,
        "seconds": round(time.perf_counter() - t0, 3),
        "stages": runner.summary,
    }
