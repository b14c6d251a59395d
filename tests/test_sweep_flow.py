"""The sweep flow (flows/sweep.py) under prefect_test_harness, on the `tiny` profile and the real
stage functions: one child pipeline run per point, stages shared through the content-keyed
cache (counted by `GLYPH_TEST_EXEC_LOG`, as in tests/test_pipeline_flow.py), points in flight
at once, a failing point that does not stop the others, a rerun that recomputes only what
failed, the artifacts, and the deployed mode against a real deployment served by a Prefect
`Runner` (flow runs in subprocesses).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pipeline_helpers import ExecLog, harness, make_tiny_data, real_data_dir, recorded_store, tiny_overrides  # noqa: F401

from glyph_core.storage import Store
from glyph_core.sweep import find_sweep, load_metrics
from tasks.faults import EXEC_LOG_ENV, FAULT_DIR_ENV

UPSTREAM = ("unify", "generate", "filter", "rewrite")
TRAIN_GRID = {"train.max_steps": [1, 2], "train.learning_rate": [1e-3, 2e-3]}


@dataclass
class Swept:
    store: str
    data: Path
    log: ExecLog
    state: Any
    root: Path


def _sweep(store: str, data: Path, grid: dict[str, list[Any]], **kw: Any) -> Any:
    from flows.sweep import sweep

    return sweep(profile="tiny", store=store, sets=tiny_overrides(data), grid=grid, return_state=True, **kw)


def _record(store: str, state: Any) -> dict[str, Any]:
    record, _ = find_sweep(str(state.state_details.flow_run_id), Store(store))
    return record


def _ran(log: ExecLog, before: Counter[str]) -> Counter[str]:
    return log.counts() - before


def _held_locks(store: str) -> list[str]:
    """Cache locks left behind: a stage that ended, cached, failed or not, holds none."""
    locks = Path(store) / "_prefect" / "locks"
    return sorted(p.name for p in locks.glob("*.lock")) if locks.is_dir() else []


@pytest.fixture(scope="module")
def swept(harness: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swept]:  # noqa: F811
    """A 2 × 2 grid over train settings, all four points in flight at once, on a fresh store."""
    root = tmp_path_factory.mktemp("sweep")
    with recorded_store(root) as (data, log, store):
        state = _sweep(store, data, TRAIN_GRID, max_parallel=4)
        yield Swept(store=store, data=data, log=log, state=state, root=root)


def test_a_grid_over_train_settings_shares_every_upstream_stage(swept: Swept) -> None:
    """Four points that differ only in train settings: unify, generate, filter and rewrite
    execute once, though all four points asked for them at the same moment (the cache's
    SERIALIZABLE locks make the others wait and read the result); train and evaluate four times."""
    assert swept.state.is_completed(), swept.state
    assert swept.log.counts() == Counter({**dict.fromkeys(UPSTREAM, 1), "train": 4, "evaluate": 4})
    record = _record(swept.store, swept.state)
    assert [p["state"] for p in record["points"]] == ["completed"] * 4
    keys = [{s["stage"]: s["key"] for s in p["stages"]} for p in record["points"]]
    for stage in UPSTREAM:
        assert len({k[stage] for k in keys}) == 1, stage
    assert len({k["train"] for k in keys}) == 4 and len({k["evaluate"] for k in keys}) == 4
    # One of the four computed each upstream stage, the other three found it Cached.
    for stage in UPSTREAM:
        ran = [s["cached"] for p in record["points"] for s in p["stages"] if s["stage"] == stage]
        assert sorted(ran) == [False, True, True, True], stage
    metrics = load_metrics(record, Store(swept.store))
    assert sorted(metrics) == ["p1", "p2", "p3", "p4"]
    assert {p["settings"]["train.max_steps"] for p in record["points"]} == {1, 2}
    assert swept.state.result()["record"].endswith(f"{record['id']}/sweep.json")
    assert _held_locks(swept.store) == []


def test_the_points_are_child_runs_of_the_sweep(swept: Swept) -> None:
    """In the UI the sweep's subflow runs are its points, named after them, and each point's
    pipeline run left its summary where a deployed sweep reads it back."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    record = _record(swept.store, swept.state)
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[record["id"]])
            )
        )
        flows = {client.read_flow(c.flow_id).name for c in children}
    assert flows == {"glyph-pipeline"}
    assert sorted(c.name for c in children) == [
        "p1: max_steps=1 learning_rate=0.001",
        "p2: max_steps=1 learning_rate=0.002",
        "p3: max_steps=2 learning_rate=0.001",
        "p4: max_steps=2 learning_rate=0.002",
    ]
    assert {str(c.id) for c in children} == {p["flow_run_id"] for p in record["points"]}
    for p in record["points"]:
        written = json.loads((Path(swept.store) / "_runs" / p["flow_run_id"] / "summary.json").read_text())
        assert [s["key"] for s in written["stages"]] == [s["key"] for s in p["stages"]]


def test_the_comparison_is_published_as_artifacts_and_beside_the_record(swept: Swept) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    record = _record(swept.store, swept.state)
    with get_client(sync_client=True) as client:
        (md,) = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["glyph-sweep"]))
        )
        (table,) = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["glyph-sweep-table"]))
        )
    assert str(md.flow_run_id) == record["id"] and str(table.flow_run_id) == record["id"]
    assert "![Frontier" in md.data and "(data:image/png;base64,iVBOR" in md.data
    assert "| p4 | 2 | 0.002 |" in md.data and "Best point:" in md.data
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["point"] for r in rows] == ["p1", "p2", "p3", "p4"]
    here = Path(swept.store) / "_sweeps" / record["id"]
    assert (here / "frontier.png").read_bytes().startswith(b"\x89PNG")
    assert "| p1 | 1 | 0.001 |" in (here / "table.md").read_text()


def test_running_the_sweep_again_recomputes_nothing(swept: Swept) -> None:
    before = swept.log.counts()
    again = _sweep(swept.store, swept.data, TRAIN_GRID, max_parallel=2)
    assert again.is_completed(), again
    assert _ran(swept.log, before) == Counter()
    record = _record(swept.store, again)
    assert all(s["cached"] for p in record["points"] for s in p["stages"])


def test_a_failed_point_does_not_stop_the_others_and_a_rerun_redoes_only_it(
    swept: Swept, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One point at a time, so the first point is the one whose training meets the injected
    fatal fault; the other three complete and are compared; the sweep ends Failed naming it.
    Run again without the fault: only that point's train and evaluate execute."""
    from flows.sweep import SweepIncomplete

    grid = {"train.seed": [1, 2], "train.max_steps": [1, 2]}
    monkeypatch.setenv(FAULT_DIR_ENV, str(tmp_path))
    (tmp_path / "train.fatal").touch()
    before = swept.log.counts()
    state = _sweep(swept.store, swept.data, grid, max_parallel=1)
    assert state.is_failed()
    with pytest.raises(SweepIncomplete, match=r"1 of 4 points failed \(p1\)"):
        state.result()
    assert _ran(swept.log, before) == Counter({"train": 4, "evaluate": 3})  # the upstream stages: Cached
    record = _record(swept.store, state)
    assert [p["state"] for p in record["points"]] == ["failed", "completed", "completed", "completed"]
    assert "injected failure in train" in record["points"][0]["error"]
    assert sorted(load_metrics(record, Store(swept.store))) == ["p2", "p3", "p4"]
    table = (Path(swept.store) / "_sweeps" / record["id"] / "table.md").read_text()
    assert "| p1 | 1 | 1 | failed: GlyphError: injected failure in train" in table
    assert _held_locks(swept.store) == []  # the failed point released what it held

    monkeypatch.delenv(FAULT_DIR_ENV)
    before = swept.log.counts()
    again = _sweep(swept.store, swept.data, grid, max_parallel=2)
    assert again.is_completed(), again
    assert _ran(swept.log, before) == Counter({"train": 1, "evaluate": 1})
    record = _record(swept.store, again)
    assert [p["state"] for p in record["points"]] == ["completed"] * 4
    ran = {p["name"]: [s["stage"] for s in p["stages"] if not s["cached"]] for p in record["points"]}
    assert ran == {"p1": ["train", "evaluate"], "p2": [], "p3": [], "p4": []}


def test_a_bad_point_fails_the_sweep_before_any_point_runs(swept: Swept) -> None:
    from glyph_core.sweep import SweepError

    before = swept.log.counts()
    state = _sweep(swept.store, swept.data, {"train.learning_rate": [1e-3, -1.0]})
    assert state.is_failed()
    with pytest.raises(SweepError, match=r"point p2 .*must be > 0"):
        state.result()
    assert _ran(swept.log, before) == Counter()


def test_inline_gpu_stages_take_turns_while_cpu_stages_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tasks.dispatch.INLINE_GPU`: inline, two points never run GPU stages at the same time in
    one process (the stage's run is replaced by one that records how many are inside at once)."""
    from glyph_core.stages import get
    from tasks import dispatch

    inside, peak, lock = 0, Counter[str](), threading.Lock()

    def fake_run_here(stage: Any, store: Any, cfg: Any, refs: Any, progress: Any = None) -> None:
        nonlocal inside
        with lock:
            inside += 1
            peak[stage.name] = max(peak[stage.name], inside)
        time.sleep(0.2)
        with lock:
            inside -= 1

    monkeypatch.setattr(dispatch, "run_here", fake_run_here)
    monkeypatch.delenv(dispatch.ENV_DEPLOYMENT, raising=False)
    for name in ("train", "filter"):
        stage = get(name)
        threads = [
            threading.Thread(target=dispatch.execute, args=(stage, None, stage.config(), {}))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert peak == Counter({"train": 1, "filter": 3})


@pytest.mark.slow
def test_deployed_points_are_runs_of_the_pipeline_deployment(
    harness: None,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`pipeline_deployment`: each point is a flow run of `glyph-pipeline/<name>` started with
    run_deployment as a subflow of the sweep, executed by a real Prefect `Runner` in its own
    process (as a worker would), and read back from the store; shared stages still run once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.runner import Runner

    from flows.pipeline import pipeline

    data = make_tiny_data(real_data_dir(), tmp_path / "data")
    log = ExecLog(tmp_path / "executions.log")
    monkeypatch.setenv(EXEC_LOG_ENV, str(log.path))
    monkeypatch.delenv(FAULT_DIR_ENV, raising=False)
    monkeypatch.setenv("GLYPH_DISPATCH_POLL_S", "1")
    monkeypatch.setenv("GLYPH_CRASH_GRACE_S", "5")
    runner = Runner(name="sweep-test-runner", limit=2, query_seconds=1)
    runner.add_flow(pipeline, name="sweep-test")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            asyncio.run(runner.start(run_once=True))
            time.sleep(0.5)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(serve,), daemon=True)
    thread.start()
    try:
        state = _sweep(
            str(tmp_path / "store"), data, {"train.max_steps": [1, 2]}, pipeline_deployment="sweep-test"
        )
    finally:
        stop.set()
        thread.join(120)
    assert state.is_completed(), state
    assert log.counts() == Counter({**dict.fromkeys(UPSTREAM, 1), "train": 2, "evaluate": 2})
    record = _record(str(tmp_path / "store"), state)
    assert [p["state"] for p in record["points"]] == ["completed", "completed"]
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[record["id"]])
            )
        )
        deployment = client.read_deployment_by_name("glyph-pipeline/sweep-test")
    assert {str(c.id) for c in children} == {p["flow_run_id"] for p in record["points"]}
    assert {c.deployment_id for c in children} == {deployment.id}
    assert all("glyph-sweep-point" in c.tags for c in children)
    assert sorted(load_metrics(record, Store(str(tmp_path / "store")))) == ["p1", "p2"]
