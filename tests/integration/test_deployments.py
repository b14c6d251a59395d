"""Deployments end to end (docs/design.md, "GPU stages"): a real server, `glyph deploy`, real `cpu` and `gpu` workers.

Runs are created through the API the way the UI does it: "Run" posts
`/deployments/{id}/create_flow_run`; "Retry" posts `/flow_runs/{id}/set_state` with a
`SCHEDULED` state named `AwaitingRetry` and `force=false` (Prefect 3.9's UI, `retryFlowRun`).

The tests share one session (server, deployments, workers) and run in file order: the watcher
test edits the session's data copy, so it comes after the pipeline tests, and the redeploy test
checks the parameters the watcher test edited. The UI test (Chromium) looks at what a person
sees: the evaluation artifact with its plot, the run graph, the run form.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from .browser import CHROMIUM_NAMES, DRIVER_NAMES, Browser, find
from .stack import DEPLOY_S, REPO, Stack, glyph_cmd, settings, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PIPELINE = "glyph-pipeline/default"
RUN_TIMEOUT_S = 600
EARLIER = ("unify", "generate", "filter", "rewrite")
STAGES = (*EARLIER, "train", "evaluate")
SHOTS = REPO / "test-artifacts"


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


def artifacts(flow_run_id: Any) -> dict[str, Any]:
    """The flow run's artifacts by key (the newest of a key)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client() as c:
        found = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert all(a.key for a in found), [a.description for a in found if not a.key]
    return {a.key: a for a in sorted(found, key=lambda a: a.created)}


def graph_parents(flow_run_id: Any) -> dict[str, set[str]]:
    """The run graph the UI draws (`/flow_runs/{id}/graph-v2`): each stage task's parents."""
    with client() as c:
        graph = c._client.get(f"/flow_runs/{flow_run_id}/graph-v2").json()
    nodes = {node["id"]: node for _, node in graph["nodes"]}
    label = {i: n["label"].rsplit("-", 1)[0] for i, n in nodes.items()}
    return {label[i]: {label[p["id"]] for p in n["parents"]} for i, n in nodes.items() if label[i] in STAGES}


def logged(flow_run_id: Any, phrase: str) -> list[str]:
    """The run's log lines containing `phrase`, waited for (logs reach the API in batches)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTextSearch

    def lines() -> list[str]:
        with client() as c:
            logs = c.read_logs(
                log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                    text=LogFilterTextSearch(query=f'"{phrase}"'),
                )
            )
        return [log.message for log in logs if phrase in log.message]

    return wait_until(lines, 60, f"log lines with {phrase!r}")


def link_parent(child: Any) -> Any:
    """The task run a GPU child hangs under in its parent's graph (through its link task)."""
    with client() as c:
        link = c.read_task_run(child.parent_task_run_id)
    (parent,) = link.task_inputs["__parents__"]
    return parent.id


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
    """One named artifact per stage (paths as text, no `file://`), the evaluation with its plot,
    the training metrics, the summary; the graph's edges are the stages' dependencies."""
    run = tiny_run["run"]
    assert run.state.is_completed(), describe(run)
    assert run.work_pool_name == "cpu"

    arts = artifacts(run.id)
    for stage in STAGES:
        data = arts[f"glyph-{stage}"].data
        assert data.startswith(f"### {stage}: ran in "), data[:100]
        paths = re.findall(r"\| `(/[^`]+)` \|", data)
        assert paths and all(p.startswith(str(tiny_run["store"])) and Path(p).exists() for p in paths), paths
    for a in arts.values():
        assert "file://" not in json.dumps(a.data, default=str), a.key
    evaluation = arts["glyph-evaluation"].data
    assert "## Promptless evaluation: base vs tuned" in evaluation
    (encoded,) = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", evaluation)
    assert base64.b64decode(encoded).startswith(b"\x89PNG") and len(evaluation) < 120_000
    metrics = arts["glyph-train-metrics"].data
    metrics = json.loads(metrics) if isinstance(metrics, str) else metrics
    assert [r["step"] for r in metrics] == [1, 2] and all(r["loss"] > 0 for r in metrics)
    assert "| evaluate | ran |" in arts["glyph-pipeline-summary"].data

    assert graph_parents(run.id) == {
        "unify": set(),
        "generate": {"unify"},
        "filter": {"generate", "unify"},
        "rewrite": {"filter", "unify"},
        "train": {"rewrite"},
        "evaluate": {"unify", "train"},
    }


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
    for stage in STAGES:
        assert stage in tasks, sorted(tasks)
    gpu_log = api.procs["worker-gpu"].log.read_text(errors="replace")
    for runs in kids.values():
        assert str(runs[0].id) in gpu_log, "the gpu worker did not run it"
    # Each child hangs under its stage's task in the parent's graph, and shows its own results.
    for stage, runs in kids.items():
        assert link_parent(runs[0]) == tasks[stage][-1].id, stage
    assert "glyph-evaluation" in artifacts(kids["evaluate"][0].id)
    train_arts = artifacts(kids["train"][0].id)
    assert {"glyph-train", "glyph-train-metrics", "glyph-train-progress"} <= set(train_arts)
    assert train_arts["glyph-train-progress"].data == 100.0
    assert logged(kids["train"][0].id, "step 2/2 loss ")  # the trainer's own line


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
    # In the graph, each train child hangs under the train task of its own attempt.
    first_train, second_train = kids["train"]
    assert link_parent(first_train) == tasks["train"][0].id
    assert link_parent(second_train) == tasks["train"][-1].id != tasks["train"][0].id


def test_changed_dataset_triggers_a_pipeline_run(api: Stack, tiny_run: dict[str, Any]) -> None:
    """Watcher runs: first (records, no event), unchanged (no event), changed file (event, and
    the deployment trigger starts a pipeline run, which completes)."""
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.types._datetime import now

    variable = f"glyph_it_{uuid.uuid4().hex[:8]}"
    params = {"variable": variable}  # the data the pipeline deployment reads: tiny's, $GLYPH_DATA_DIR
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
    from prefect.variables import Variable

    assert list(Variable.get(variable)) == [f"local:{api.data_dir.resolve()}"]  # the pipeline's data
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
    assert run.parameters["changed_sources"] == ["gsm8k"], run.parameters  # from the event
    assert run.parameters["profile"] == "tiny" and run.parameters["store"] == str(tiny_run["store"])
    assert logged(run.id, "started because these sources changed: gsm8k")
    assert "Started because these sources changed: gsm8k" in artifacts(run.id)["glyph-pipeline-summary"].data
    print(f"\ntriggered pipeline run {run.name}: {run.state.name}")


def test_redeploy_keeps_parameters_edited_in_the_ui(api: Stack) -> None:
    """The watcher test set the pipeline's parameters as a person would in the UI; `glyph deploy`
    keeps them, `glyph deploy --reset-parameters` gives the file's (none: the flow's defaults)."""
    with client() as c:
        edited = c.read_deployment_by_name(PIPELINE).parameters
    assert edited.get("profile") == "tiny", edited

    def deploy(*extra: str) -> str:
        proc = subprocess.run(
            glyph_cmd("deploy", *extra),
            cwd=REPO,
            env=api.env,
            capture_output=True,
            text=True,
            timeout=DEPLOY_S,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = deploy()
    assert f"kept the parameters of {PIPELINE}" in out, out
    with client() as c:
        assert c.read_deployment_by_name(PIPELINE).parameters == edited
    deploy("--reset-parameters")
    with client() as c:
        assert c.read_deployment_by_name(PIPELINE).parameters == {}


def _browser(api: Stack) -> Browser:
    chromium, driver = find(CHROMIUM_NAMES), find(DRIVER_NAMES)
    if chromium is None or driver is None:
        message = "no chromium or chromedriver on PATH (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them: a missing browser there is a broken setup
        pytest.skip(message)
    return Browser(chromium, driver, api.root / "chromium-profile")


def _green_pixels(png: Path, box: dict[str, float]) -> int:
    """Pixels of the Completed state's green inside `box` (CSS pixels) of a screenshot."""
    import numpy as np
    from PIL import Image

    img = Image.open(png).convert("RGB")
    crop = img.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["w"]), int(box["y"] + box["h"])))
    r, g, b = (np.asarray(crop).astype(int)[..., i] for i in range(3))
    return int(((g > 140) & (g > r + 60) & (g > b + 40)).sum())


def test_ui_shows_evaluation_graph_progress_and_form(api: Stack, tiny_run: dict[str, Any]) -> None:
    """Chromium on the real UI: the evaluation artifact with its plot, the run graph with the
    stages and their edges, the training progress, the typed run form; screenshots in
    test-artifacts/."""
    run = tiny_run["run"]
    arts = artifacts(run.id)
    ui = api.ui_url
    SHOTS.mkdir(exist_ok=True)
    with _browser(api) as b:
        # The evaluation: the rendered report and the plot, decoded by the browser.
        b.open(f"{ui}/artifacts/artifact/{arts['glyph-evaluation'].id}")
        size = b.wait(
            "const i = document.querySelector('img[src^=\"data:image/png;base64,\"]');"
            "return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null",
            120,
            "the evaluation plot",
        )
        assert size[0] >= 1000 and size[1] >= 300, size  # 13 x 3.8 in at 110 dpi
        text = b.script("return document.body.innerText")
        assert "Promptless evaluation: base vs tuned" in text and "Selectivity within each source" in text
        b.script("document.querySelector('img[src^=\"data:image/png\"]').scrollIntoView({block: 'start'})")
        b.screenshot(SHOTS / "ui-evaluation.png")

        # The run graph: drawn on a canvas from the graph API; nodes are the stages, edges their
        # dependencies (checked on the API the UI draws from, and in the picture's pixels).
        b.open(f"{ui}/runs/flow-run/{run.id}")
        box = b.wait(
            "const c = document.querySelector('.flow-run-graph canvas');"
            "const loaded = performance.getEntriesByType('resource').some(e => e.name.includes('/graph-v2'));"
            "if (!c || !loaded || c.width === 0) return null;"
            "const r = c.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}",
            120,
            "the run graph",
        )
        time.sleep(3)  # the graph animates into place
        shot = b.screenshot(SHOTS / "ui-flow-run-graph.png")
        assert _green_pixels(shot, box) > 2000, "no Completed nodes drawn in the run graph"
        assert graph_parents(run.id)["evaluate"] == {"unify", "train"}
        assert "6 Task runs" in b.script("return document.body.innerText")

        # Training progress: the train child's progress artifact at 100 %.
        (train,) = children(run.id)["train"]
        progress = artifacts(train.id)["glyph-train-progress"]
        b.open(f"{ui}/artifacts/artifact/{progress.id}")
        b.wait("return document.body.innerText.includes('Progress: 100%')", 120, "the training progress")
        b.screenshot(SHOTS / "ui-train-progress.png")

        # The run form: profile a dropdown of the profiles, refresh a multi-select.
        with client() as c:
            deployment = c.read_deployment_by_name(PIPELINE)
        b.open(f"{ui}/deployments/deployment/{deployment.id}/run")
        options = b.wait(
            "const o = Array.from(document.querySelectorAll('select option')).map(o => o.value);"
            "return o.includes('evaluate') ? o : null",
            120,
            "the run form",
        )
        assert {"tiny", "demo", "full"} <= set(options) and {"unify", "train", "all"} <= set(options), options
        text = b.script("return document.body.innerText")
        assert "profile (Optional)" in text and "refresh (Optional)" in text
        b.screenshot(SHOTS / "ui-run-form.png")

        b.open(f"{ui}/deployments")
        b.wait("return document.body.innerText.includes('glyph-pipeline')", 120, "the deployments page")
        text = b.script("return document.body.innerText")
        for name in ("glyph-generate", "glyph-train", "glyph-evaluate", "glyph-dataset-watcher"):
            assert name in text, name
        b.screenshot(SHOTS / "ui-deployments.png")
    for name in ("ui-evaluation", "ui-flow-run-graph", "ui-train-progress", "ui-run-form", "ui-deployments"):
        assert (SHOTS / f"{name}.png").stat().st_size > 10_000, name
