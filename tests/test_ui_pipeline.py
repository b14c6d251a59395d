"""What a pipeline run shows in the Prefect UI, on a real (test harness) server: named artifacts,
the evaluation with its plot, training metrics and loss lines, the run graph's edges, cached
stages pointing at the run that computed them, the run's summary for `glyph report`, typed and
checked parameters, and GPU child runs attached to the retried task (docs/ui.md).

One cold and one fully cached run of the `tiny` profile are shared by the tests.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pipeline_helpers import harness, make_tiny_data, real_data_dir, tiny_overrides  # noqa: F401
from typer.testing import CliRunner

from glyph_core.errors import GlyphError
from glyph_core.stages import names, stages

DATA_URL = re.compile(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


@dataclass
class Runs:
    store: Path
    data: Path
    cold: dict[str, Any]
    warm: dict[str, Any]


def _run(store: Path, data: Path, **kw: Any) -> dict[str, Any]:
    from flows.pipeline import pipeline

    return pipeline(profile="tiny", store=str(store), overrides=tiny_overrides(data), **kw)


@pytest.fixture(scope="module")
def runs(harness: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:  # noqa: F811
    root = tmp_path_factory.mktemp("ui")
    data = make_tiny_data(real_data_dir(), root / "data")
    cold = _run(root / "store", data)
    warm = _run(root / "store", data)
    yield Runs(store=root / "store", data=data, cold=cold, warm=warm)


def client() -> Any:
    from prefect import get_client

    return get_client(sync_client=True)


def artifacts_of(flow_run_id: str) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client() as c:
        return c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def by_key(flow_run_id: str) -> dict[str, Any]:
    return {a.key: a for a in artifacts_of(flow_run_id)}


def test_one_named_artifact_per_stage_and_result_no_file_links(runs: Runs) -> None:
    found = artifacts_of(runs.cold["flow_run"]["id"])
    assert all(a.key for a in found), [a.description for a in found if not a.key]
    keys = {a.key for a in found}
    expected = {f"glyph-{s}" for s in names()} | {
        "glyph-evaluation",
        "glyph-train-metrics",
        "glyph-pipeline-summary",
    }
    assert expected <= keys and keys - expected <= {f"glyph-{s}-progress" for s in names()}, sorted(keys)
    assert len([a for a in found if a.key == "glyph-evaluation"]) == 1
    for a in found:
        assert "file://" not in json.dumps(a.data, default=str), a.key
    stage = {a.key: a for a in found}
    for s in stages():
        data = stage[f"glyph-{s.name}"].data
        assert data.startswith(f"### {s.name}: ran in "), data[:80]
        assert all(f"`{uri}`" in data for uri in runs.cold["stages"][names().index(s.name)]["refs"].values())


def test_evaluation_artifact_has_the_report_and_the_plot(runs: Runs) -> None:
    from glyph_core.eval_report import headline_lines, markdown_report

    evaluate = runs.cold["stages"][-1]
    metrics_uri = runs.store / "evaluate" / evaluate["key"] / "metrics.json"
    metrics = json.loads(metrics_uri.read_text())
    for run in (runs.cold, runs.warm):  # a cached run shows its evaluation too
        art = by_key(run["flow_run"]["id"])["glyph-evaluation"]
        assert markdown_report(metrics, original_study=True).strip() in art.data
        (encoded,) = DATA_URL.findall(art.data)
        png = base64.b64decode(encoded)
        assert png == (metrics_uri.parent / "emergence_accuracy.png").read_bytes()
        assert len(art.data.encode()) < 120_000
    assert runs.cold["headline"] == headline_lines(metrics)


def test_training_metrics_table_loss_curve_and_loss_lines_in_the_log(runs: Runs) -> None:
    import pyarrow.parquet as pq
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    train = runs.cold["stages"][names().index("train")]
    rows = pq.read_table(train["refs"]["metrics"]).to_pylist()
    assert len(rows) == 2  # tiny: two optimizer steps, one log entry each
    arts = by_key(runs.cold["flow_run"]["id"])
    table = arts["glyph-train-metrics"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [(r["step"], r["loss"]) for r in table] == [(r["step"], r["loss"]) for r in rows]
    assert DATA_URL.findall(arts["glyph-train"].data), "no loss curve in the train artifact"
    progress = arts["glyph-train-progress"]
    assert progress.type == "progress" and progress.data == 100.0

    # Run logs reach the API in batches from a background worker: wait (bounded) for the last ones.
    wanted = (
        "step 1/2 loss ",
        "step 2/2 loss ",
        "train: 2 steps, loss ",
        "tuned: within-source selectivity AUROC",
    )
    deadline = time.monotonic() + 30
    while True:
        with client() as c:
            logs = c.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs.cold["flow_run"]["id"]]))
            )
        messages = [log.message for log in logs]
        if all(any(m.startswith(w) for m in messages) for w in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any(m.startswith("step 1/2 loss ") for m in messages), messages  # the trainer's own line
    assert any(m.startswith("step 2/2 loss ") for m in messages)
    assert any(m.startswith("train: 2 steps, loss ") for m in messages)
    assert any(m.startswith("tuned: within-source selectivity AUROC") for m in messages)  # the headline


def test_run_graph_has_the_stage_dependencies_as_edges(runs: Runs) -> None:
    with client() as c:
        graph = c._client.get(f"/flow_runs/{runs.cold['flow_run']['id']}/graph-v2").json()
    nodes = {node["id"]: node for _, node in graph["nodes"]}
    label = {i: n["label"].rsplit("-", 1)[0] for i, n in nodes.items()}
    parents = {label[i]: {label[p["id"]] for p in n["parents"]} for i, n in nodes.items()}
    producers = {
        s.name: {p.name for p in stages() for name in s.inputs if name in p.outputs} for s in stages()
    }
    assert parents == producers, parents
    assert producers["evaluate"] == {"unify", "train"} and producers["generate"] == {"unify"}


def test_cached_stage_links_the_artifact_that_computed_it(runs: Runs) -> None:
    cold = by_key(runs.cold["flow_run"]["id"])
    warm = by_key(runs.warm["flow_run"]["id"])
    assert all(r["cached"] for r in runs.warm["stages"])
    for s in names():
        data = warm[f"glyph-{s}"].data
        assert data.startswith(f"### {s}: Cached"), data[:80]
        assert f"/artifacts/artifact/{cold[f'glyph-{s}'].id})" in data, data
        assert f"/runs/flow-run/{runs.cold['flow_run']['id']})" in data


def test_summary_is_kept_per_run_and_report_finds_it_through_the_api(runs: Runs, tmp_path: Path) -> None:
    from glyph_cli.main import app

    run = runs.cold["flow_run"]
    saved = json.loads((runs.store / "_runs" / run["id"] / "summary.json").read_text())
    assert saved["stages"] == runs.cold["stages"] and saved["flow_run"]["name"] == run["name"]
    summary = by_key(run["id"])["glyph-pipeline-summary"].data
    assert all(f"| {s} | ran |" in summary for s in names())
    # Another default store (as on another machine): the run is found through the API, and its
    # summary in the store its parameters name.
    for ref in (run["id"], run["name"]):
        result = CliRunner().invoke(
            app,
            ["report", ref, "--out", str(tmp_path / "r.md")],
            env={"GLYPH_STORE": str(tmp_path / "empty")},
        )
        assert result.exit_code == 0, result.output
        assert str(runs.store) in result.output and "glyph emergence" in result.output
    result = CliRunner().invoke(app, ["report", "no-such-run"], env={"GLYPH_STORE": str(tmp_path / "empty")})
    assert result.exit_code == 1 and "no flow run named 'no-such-run'" in result.output


def test_bad_overrides_fail_first_with_the_clis_line(runs: Runs) -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import pipeline
    from glyph_core.profiles import load_profile

    bad = {**tiny_overrides(runs.data), "train.max_steps": "many"}
    with pytest.raises(GlyphError) as cli:
        load_profile("tiny", bad)
    with pytest.raises(GlyphError) as flow:
        pipeline(profile="tiny", store=str(runs.store / "bad"), overrides=bad)
    assert str(flow.value) == str(cli.value)
    assert str(cli.value).startswith("train.max_steps='many': must be a valid integer")
    assert not (runs.store / "bad").exists(), "a stage ran before the settings were checked"
    with pytest.raises(ParameterTypeError, match="refresh"):
        _run(runs.store, runs.data, refresh=["filtr"])
    with pytest.raises(ParameterTypeError, match="profile"):
        pipeline(profile="small", store=str(runs.store))


# ---------------------------------------------------------------------------------------------
# GPU child runs after a Retry


def test_a_retried_parents_new_child_hangs_under_the_retried_task(harness: None) -> None:  # noqa: F811
    """Two attempts of one parent flow run (as the UI's Retry makes them: same flow run, a new
    process), each dispatching `train` to a deployment: the second attempt's child is attached
    to the second attempt's task, not to the first's (what `run_deployment` did)."""
    import logging

    from prefect import flow, task
    from prefect.client.schemas.objects import StateType
    from prefect.flow_engine import run_flow
    from prefect.states import Failed, State

    from tasks.children import Child, start_children

    attempt = {"n": 0}

    @task(name="train")
    def dispatch() -> str:
        (child,) = start_children("train", "ui-test", [Child({"n": 1})], logger=logging.getLogger("test"))
        attempt["n"] += 1
        if attempt["n"] == 1:
            raise RuntimeError("the first attempt fails after dispatching")
        return str(child.id)

    @flow(name="ui-test-parent")
    def parent() -> str:
        return dispatch()

    @flow(name="glyph-train")
    def child_flow(n: int) -> None:
        pass

    with client() as c:
        flow_id = c.create_flow(child_flow)
        c.create_deployment(flow_id=flow_id, name="ui-test", enforce_parameter_schema=False)
        run = c.create_flow_run(parent)
    state = run_flow(parent, flow_run=run, return_type="state")
    assert state.is_failed()
    with client() as c:
        first_children = _children(c, run.id)
        (first,) = first_children
        c.set_flow_run_state(first.id, Failed(message="the GPU run failed"), force=True)
        c.set_flow_run_state(run.id, State(type=StateType.SCHEDULED, name="AwaitingRetry"), force=True)
        run = c.read_flow_run(run.id)
    state = run_flow(parent, flow_run=run, return_type="state")
    assert state.is_completed(), state
    with client() as c:
        kids = _children(c, run.id)
        assert len(kids) == 2
        second = next(k for k in kids if k.id != first.id)
        tasks = sorted(
            (t for t in _task_runs(c, run.id) if t.name.startswith("train-")), key=lambda t: t.created
        )
        assert len(tasks) == 2
        for kid, calling in ((first, tasks[0]), (second, tasks[1])):
            link = c.read_task_run(kid.parent_task_run_id)
            assert [p.id for p in link.task_inputs["__parents__"]] == [calling.id], (
                kid.name,
                link.task_inputs,
            )


def _children(c: Any, parent_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return c.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
    )


def _task_runs(c: Any, flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
