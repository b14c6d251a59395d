"""The pipeline flow: every declared stage in order (docs/design.md, "The pipeline flow").

The wiring is derived from the declarations in `glyph_core/stages.py`: each stage gets the refs
its `inputs` name, from the outputs of the stages before it (checked when the stages are
declared), and its config from the profile. What a stage does lives in `glyph_core`, how it is
cached, retried and sent to the GPU pool in `tasks`. Between stages only small refs travel.

Caching is content-keyed, so a rerun with nothing changed returns every stage `Cached` in
seconds, and a retry of a failed run (same flow-run id) recomputes only the failed stage and
what follows it. `refresh` forces chosen stages *and every later stage* to recompute, because
Prefect has no "restart from task X" and a refreshed stage's consumers should see the rerun.
The GPU stages run on the GPU pool when a GPU deployment is configured (`gpu_pool`, else
`$GLYPH_GPU_DEPLOYMENT`, which the pipeline deployment sets), inline otherwise.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from glyph_core.errors import GlyphError
from glyph_core.outputs import Ref, StageOutput, verify_output
from glyph_core.profiles import PipelineConfig, default_store_root, load_profile
from glyph_core.stages import Stage, names, stages
from glyph_core.storage import Store
from tasks.caching import result_storage_for
from tasks.children import result_uri
from tasks.stages import stage_task_options, task_for


def refresh_set(refresh: list[str] | None) -> set[str]:
    """The named stages and every stage after the earliest of them (`all` = every stage)."""
    order = names()
    chosen = [r.strip() for r in (refresh or []) if r.strip()]
    if not chosen:
        return set()
    if "all" in chosen:
        return set(order)
    unknown = [n for n in chosen if n not in order]
    if unknown:
        raise GlyphError(f"unknown stage(s) in refresh: {', '.join(unknown)}; expected {', '.join(order)}")
    first = min(order.index(n) for n in chosen)
    return set(order[first:])


class _Runner:
    """Runs one stage task with the per-run options and records what happened."""

    def __init__(self, store: Store, cfg: PipelineConfig, refresh: set[str]) -> None:
        self.store = store
        self.cfg = cfg
        self.refresh = refresh
        self.summary: list[dict[str, Any]] = []
        self.logger = get_run_logger()
        self.result_storage = result_storage_for(store.root)

    def _call(self, stage: Stage, refresh: bool, refs: dict[str, Ref]) -> tuple[StageOutput, bool]:
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
            return_state=True,
        )
        out = state.result()  # raises the task's own exception if it failed
        return out, state.name == "Cached"

    def run(self, stage: Stage, refs: dict[str, Ref]) -> StageOutput:
        t0 = time.perf_counter()
        out, cached = self._call(stage, stage.name in self.refresh, refs)
        if cached and not verify_output(self.store, out):
            # A cache record outlived its artifact (deleted, damaged): never hand that on.
            self.logger.warning("%s: cached artifact missing or damaged; recomputing", stage.name)
            out, cached = self._call(stage, True, refs)
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
                "drops": out.stats.drops,
            }
        )
        self.logger.info("%s: %s in %.2fs → %s", stage.name, "Cached" if cached else "ran", wall, out.ref.uri)
        return out


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

    refs: dict[str, Ref] = {}  # every output so far, by the name its stage declared
    for stage in stages():
        out = runner.run(stage, {name: refs[name] for name in stage.inputs})
        refs.update(out.refs)

    create_table_artifact(
        key="glyph-pipeline-summary",
        table=[{k: v for k, v in row.items() if k not in ("refs", "drops")} for row in runner.summary],
        description=f"profile {profile} on {st.root}: cached or not, seconds per stage",
    )
    summary = {
        "profile": profile,
        "store": st.root,
        "seconds": round(time.perf_counter() - t0, 3),
        "stages": runner.summary,
    }
    # Where a sweep that started this run through the deployment reads it back (flows/sweep.py).
    st.publish_bytes(result_uri(st, flow_run.id, "pipeline"), json.dumps(summary, default=str).encode())
    return summary
