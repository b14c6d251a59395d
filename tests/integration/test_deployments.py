"""Deployments end to end (docs/design.md, "GPU stages"): a real server, `glyph deploy`, real `cpu` and `gpu` workers.

Runs are created through the API the way the UI does it: "Run" posts
`/deployments/{id}/create_flow_run`; "Retry" posts `/flow_runs/{id}/set_state` with a
`SCHEDULED` state named `AwaitingRetry` and `force=false` (Prefect 3.9's UI, `retryFlowRun`).

The tests share one session (server, deployments, workers) and run in file order: the watcher
test edits the session's data copy, so it comes after the pipeline tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from .stack import REPO, Stack, settings, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PIPELINE = "glyph-pipeline/default"
RUN_TIMEOUT_S = 600
EARLIER = ("unify", "generate", "filter", "rewrite")


# ---------------------------------------------------------------------------------------------
# helpers


def client():
    from prefect import get_client

    return get_client(sync_client=True)


def create_run(deployment: str, parameters: dict[str, Any]) -> Any:
    """What the UI's Run button does: a flow run from the deployment, Scheduled now."""
    with client() as c:
        dep = c.read_deployment_by_name(deployment)
        return c.create_flow_run_from_deployment(dep.id, parameters=parameters)


def wait_final(flow_run_id: Any, timeout: float = RUN_TIMEOUT_S) -> Any:
    def final() -> Any:
        with client() as c:
            run = c.read_flow_run(flow_run_id)
        return run if run.state is not None and run.state.is_final() else None

    return wait_until(final, timeout, f"flow run {flow_run_id} to finish", interval=2)


def children(parent_id: Any) -> dict[str, list[Any]]:
    """The GPU stage flow runs dispatched by a pipeline run, by stage, oldest first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with client() as c:
        runs = c.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )
        flows = {f_id: c.read_flow(f_id).name for f_id in {r.flow_id for r in runs}}
    out: dict[str, list[Any]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.created):
        out[flows[run.flow_id].removeprefix("glyph-")].append(run)
    return dict(out)


def task_runs_by_name(flow_run_id: Any) -> dict[str, list[Any]]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client() as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    out: dict[str, list[Any]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.created):
        out[run.name.rsplit("-", 1)[0]].append(run)
    return dict(out)


def state_names(flow_run_id: Any) -> list[str]:
    with client() as c:
        states = c.read_flow_run_states(flow_run_id)
    return [s.name for s in sorted(states, key=lambda s: s.timestamp)]


def describe(run: Any) -> str:
    return f"{run.name} ({run.id}): {run.state.name if run.state else None} {run.state.message if run.state else ''}"


def dataset_events(since: Any) -> list[Any]:
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    with client() as c:
        page = c.read_events(
            filter=EventFilter(
                event=EventNameFilter(name=["glyph.dataset.changed"]),
                occurred=EventOccurredFilter(since=since),
            ),
            limit=50,
        )
    return list(page.events)


# ---------------------------------------------------------------------------------------------
# one tiny pipeline run shared by the first tests


@pytest.fixture(scope="module")
def tiny_run(stack: Stack) -> dict[str, Any]:
    store = stack.root / "store-main"
    with settings(stack):
        t0 = time.monotonic()
        created = create_run(PIPELINE, {"profile": "tiny", "store": str(store)})
        run = wait_final(created.id)
        seconds = time.monotonic() - t0
    print(f"\ntiny pipeline through the workers: {run.state.name} in {seconds:.1f}s")
    return {"run": run, "store": store, "seconds": seconds}


def test_ui_run_completes_and_stage_artifacts_are_visible(api: Stack, tiny_run: dict[str, Any]) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run = tiny_run["run"]
    assert run.state.is_completed(), describe(run)
    assert run.work_pool_name == "cpu"

    with client() as c:
        artifacts = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    keys = {a.key for a in artifacts if a.key}
    for stage in ("unify", "generate", "filter", "rewrite", "train", "evaluate"):
        assert f"glyph-{stage}" in keys, f"no table artifact for {stage}: {sorted(keys)}"
        assert f"glyph-{stage}-output" in keys, f"no link artifact for {stage}: {sorted(keys)}"
    outputs = [a for a in artifacts if a.key and a.key.endswith("-output")]
    assert len(outputs) == 6, [a.key for a in outputs]
    for a in outputs:  # link artifacts are stored as markdown: [text](link)
        match = re.search(r"\]\((.+?)\)", a.data or "")
        assert match, f"{a.key}: {a.data!r}"
        path = Path(match.group(1).removeprefix("file://"))
        assert str(path).startswith(str(tiny_run["store"])), path
        assert path.exists(), f"{a.key} links to a missing artifact: {path}"


def test_gpu_stages_ran_as_their_own_runs_on_the_gpu_pool(api: Stack, tiny_run: dict[str, Any]) -> None:
    run = tiny_run["run"]
    kids = children(run.id)
    assert sorted(kids) == ["evaluate", "generate", "train"], {
        k: [describe(r) for r in v] for k, v in kids.items()
    }
    for stage, runs in kids.items():
        assert len(runs) == 1, f"{stage} dispatched {len(runs)} times"
        child = runs[0]
        assert child.state.is_completed(), describe(child)
        assert child.work_pool_name == "gpu", f"{stage} ran on {child.work_pool_name!r}"
        assert child.deployment_id is not None
        assert (tiny_run["store"] / "_runs" / str(child.id) / f"{stage}.json").is_file()
    # The CPU stages did not leave the pipeline's process: no child flow runs for them, and their
    # task runs are in the parent.
    tasks = task_runs_by_name(run.id)
    for stage in ("unify", "filter", "rewrite"):
        assert stage in tasks, sorted(tasks)
    gpu_log = api.procs["worker-gpu"].log.read_text(errors="replace")
    for runs in kids.values():
        assert str(runs[0].id) in gpu_log, "the gpu worker did not run it"


def test_ui_retry_reruns_only_the_failed_gpu_stage(api: Stack) -> None:
    """train's GPU run fails; Retry (as the UI does it) on the pipeline: unify, generate, filter,
    rewrite come back Cached, generate is not dispatched again, train runs a second time.

    During the retried run, evaluate's GPU run is SIGKILLed once (as by the OOM killer): it ends
    Crashed, the shipped automation reschedules it (same flow run id) and the pipeline, waiting
    on it, picks up its result."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    store = api.root / "store-retry"
    (api.fault_dir / "train.fatal").touch()
    created = create_run(PIPELINE, {"profile": "tiny", "store": str(store)})
    failed = wait_final(created.id)
    assert failed.state.is_failed(), describe(failed)
    kids = children(created.id)
    assert [r.state.name for r in kids.get("generate", [])] == ["Completed"], kids
    assert [r.state.name for r in kids.get("train", [])] == ["Failed"], kids
    assert "evaluate" not in kids

    (api.fault_dir / "evaluate.crash").touch()
    t0 = time.monotonic()
    with client() as c:
        result = c.set_flow_run_state(
            created.id,
            State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"),
            force=False,
        )
    assert result.status.value == "ACCEPT", result
    retried = wait_final(created.id)
    print(f"\nretry after the failed train: {retried.state.name} in {time.monotonic() - t0:.1f}s")
    assert retried.state.is_completed(), describe(retried)
    assert retried.id == created.id and retried.run_count == 2

    kids = children(created.id)
    assert [r.state.name for r in kids["generate"]] == ["Completed"], "generate was dispatched again"
    assert [r.state.name for r in kids["train"]] == ["Failed", "Completed"]
    assert [r.state.name for r in kids["evaluate"]] == ["Completed"]
    evaluate = kids["evaluate"][0]
    names = state_names(evaluate.id)
    assert not (api.fault_dir / "evaluate.crash").exists(), "the crash was not injected"
    assert "Crashed" in names and "AwaitingRetry" in names, names
    assert names.index("Crashed") < names.index("AwaitingRetry"), names
    assert evaluate.run_count == 2, f"evaluate ran {evaluate.run_count} times: {names}"

    tasks = task_runs_by_name(created.id)
    for stage in EARLIER:
        states = [t.state.name for t in tasks[stage]]
        assert states[-1] == "Cached", f"{stage}: {states}"
        assert "Completed" in states[:-1], f"{stage} never ran before the retry: {states}"
    assert [t.state.name for t in tasks["train"]][-1] == "Completed", tasks["train"]


def test_changed_dataset_triggers_a_pipeline_run(api: Stack, tiny_run: dict[str, Any]) -> None:
    """Watcher runs: first (records, no event), unchanged (no event), changed file (event, and
    the deployment trigger starts a pipeline run, which completes)."""
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.types._datetime import now

    variable = f"glyph_it_{uuid.uuid4().hex[:8]}"
    params = {"data_dir": str(api.data_dir), "sources": ["gsm8k", "svamp", "math"], "variable": variable}
    with client() as c:
        dep = c.read_deployment_by_name(PIPELINE)
        # As a person would in the UI (Edit deployment): triggered runs use tiny on the test store.
        c.update_deployment(
            dep.id, DeploymentUpdate(parameters={"profile": "tiny", "store": str(tiny_run["store"])})
        )

    def pipeline_run_ids() -> set[Any]:
        with client() as c:
            runs = c.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]))
            )
        return {r.id for r in runs}

    before = pipeline_run_ids()
    since = now("UTC")

    first = wait_final(create_run("glyph-dataset-watcher/cron", params).id, timeout=180)
    assert first.state.is_completed(), describe(first)
    second = wait_final(create_run("glyph-dataset-watcher/cron", params).id, timeout=180)
    assert second.state.is_completed(), describe(second)
    time.sleep(5)  # events are persisted in batches; give a wrongly emitted one time to show
    assert dataset_events(since) == [], "an event was emitted although nothing changed"
    assert pipeline_run_ids() == before

    # Change one source file: one more real GSM8K line in the copy.
    train = api.data_dir / "gsm8k" / "train.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(lines + lines[:1]))  # a duplicate line: content changed, still valid
    third = wait_final(create_run("glyph-dataset-watcher/cron", params).id, timeout=180)
    assert third.state.is_completed(), describe(third)

    events = wait_until(lambda: dataset_events(since), 60, "the glyph.dataset.changed event")
    assert len(events) == 1, events
    assert events[0].payload["changed"] == ["gsm8k"], events[0].payload
    new = wait_until(lambda: pipeline_run_ids() - before, 90, "the triggered pipeline run")
    assert len(new) == 1, new
    run = wait_final(next(iter(new)))
    assert run.state.is_completed(), describe(run)
    print(f"\ntriggered pipeline run {run.name}: {run.state.name}")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_ui_deployments_page_lists_the_pipeline(api: Stack) -> None:
    browser = _chromium()
    if browser is None:
        message = "no chromium on PATH (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a missing browser there is a broken setup
        pytest.skip(message)
    out = REPO / "test-artifacts"
    out.mkdir(exist_ok=True)
    shot = out / "ui-deployments.png"
    shot.unlink(missing_ok=True)
    base = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={api.root / 'chromium-profile'}",
        "--window-size=1440,1000",
        "--virtual-time-budget=20000",
    ]
    url = f"{api.ui_url}/deployments"

    def dom_lists_pipeline() -> str | None:
        proc = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        text = proc.stdout
        return text if "glyph-pipeline" in text and "Can't connect" not in text else None

    dom = wait_until(dom_lists_pipeline, 240, "the deployments page to list glyph-pipeline", interval=3)
    (out / "ui-deployments.html").write_text(dom)
    for name in ("glyph-generate", "glyph-train", "glyph-evaluate", "glyph-dataset-watcher"):
        assert name in dom, name
    subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    assert shot.is_file() and shot.stat().st_size > 10_000, "screenshot missing or empty"
