"""Fast checks of the deployment side without a server: prefect.yaml and automations.yaml are
valid and say what docs/design.md says, the GPU dispatch routes as configured, the child flows
are derived from the GPU stages' declarations, and the dataset watcher emits only on change
(prefect_test_harness).

The real server, workers, UI and triggers are exercised in tests/integration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
AUTOMATIONS = REPO / "deployments" / "automations.yaml"


def _deployments() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(PREFECT_YAML.read_text())
    return {f"{d['entrypoint']}": d for d in data["deployments"]}


def test_prefect_yaml_is_valid_and_loads_every_flow() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    model = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    names = set()
    for dep in model.deployments:
        flow = load_flow_from_entrypoint(str(REPO / dep.entrypoint))
        names.add(f"{flow.name}/{dep.name}")
    assert names == {
        "glyph-pipeline/default",
        "glyph-sweep/default",
        "glyph-generate/gpu",
        "glyph-train/gpu",
        "glyph-evaluate/gpu",
        "glyph-dataset-watcher/cron",
    }


def test_pools_concurrency_trigger_and_schedule() -> None:
    deps = _deployments()
    pipeline = deps["flows/pipeline.py:pipeline"]
    assert pipeline["work_pool"]["name"] == "cpu"
    assert pipeline["work_pool"]["job_variables"]["env"]["GLYPH_GPU_DEPLOYMENT"] == "gpu"
    # Several pipelines at once (a sweep's points); the GPU stays safe through the GPU limits below.
    assert pipeline["concurrency_limit"] == {"limit": 4, "collision_strategy": "ENQUEUE"}
    sweep = deps["flows/sweep.py:sweep"]
    assert sweep["work_pool"]["name"] == "cpu"
    assert sweep["parameters"]["pipeline_deployment"] == "default"
    assert sweep["parameters"]["max_parallel"] <= pipeline["concurrency_limit"]["limit"]
    (trigger,) = pipeline["triggers"]
    assert trigger["expect"] == ["glyph.dataset.changed"] and trigger["enabled"] is True
    for stage in ("generate", "train", "evaluate"):
        dep = deps[f"flows/gpu_stages.py:{stage}_flow"]
        assert dep["name"] == "gpu"
        assert dep["work_pool"]["name"] == "gpu"
        assert "CUDA_VISIBLE_DEVICES" in dep["work_pool"]["job_variables"]["env"]
        assert dep["concurrency_limit"]["limit"] == 1
    watcher = deps["flows/watcher.py:watch_datasets"]
    assert watcher["work_pool"]["name"] == "cpu"
    assert watcher["schedules"][0]["cron"]
    pull = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    assert "prefect.deployments.steps.set_working_directory" in pull[0]


def test_deployment_trigger_validates() -> None:
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    (trigger,) = _initialize_deployment_triggers(
        "default", _deployments()["flows/pipeline.py:pipeline"]["triggers"]
    )
    assert trigger.expect == {"glyph.dataset.changed"}


def test_crash_automation_is_proactive_on_the_gpu_pool() -> None:
    from glyph_cli.deploy import load_automations

    automations = {a.name: a for a in load_automations(AUTOMATIONS)}
    automation = automations["glyph-reschedule-crashed-gpu-runs"]
    trigger = automation.trigger
    assert trigger.posture.value == "Proactive"
    assert trigger.after == {"prefect.flow-run.Crashed"}
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.match_related.root == {
        "prefect.resource.role": "work-pool",
        "prefect.resource.name": "gpu",
    }
    (action,) = automation.actions
    assert action.type == "change-flow-run-state"
    assert action.state.value == "SCHEDULED" and action.name == "AwaitingRetry"


# ---------------------------------------------------------------------------------------------
# dispatch


@pytest.mark.parametrize(
    ("explicit", "env", "expected"),
    [
        (None, None, None),
        (None, "", None),
        (None, "gpu", "gpu"),
        (None, "inline", None),
        ("a100", "gpu", "a100"),
        ("inline", "gpu", None),
        ("", "gpu", None),
    ],
)
def test_configured_deployment(monkeypatch: pytest.MonkeyPatch, explicit, env, expected) -> None:
    from tasks.dispatch import ENV_DEPLOYMENT, configured_deployment

    if env is None:
        monkeypatch.delenv(ENV_DEPLOYMENT, raising=False)
    else:
        monkeypatch.setenv(ENV_DEPLOYMENT, env)
    assert configured_deployment(explicit) == expected


def test_execute_runs_inline_without_a_gpu_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    from glyph_core.stages import get
    from tasks import dispatch

    calls = []
    monkeypatch.delenv(dispatch.ENV_DEPLOYMENT, raising=False)
    monkeypatch.setattr(
        dispatch, "run_here", lambda stage, store, cfg, refs, progress: calls.append(stage.name) or "out"
    )
    monkeypatch.setattr(dispatch, "dispatch", lambda *a, **k: pytest.fail("dispatched"))
    assert dispatch.execute(get("train"), "STORE", get("train").config(), {"sft": "ref"}) == "out"
    # a CPU stage never goes to the GPU pool, whatever is configured
    monkeypatch.setenv(dispatch.ENV_DEPLOYMENT, "gpu")
    assert dispatch.execute(get("filter"), "STORE", get("filter").config(), {}, deployment="gpu") == "out"
    assert calls == ["train", "filter"]


def test_execute_dispatches_gpu_stages_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from glyph_core.stages import get
    from tasks import dispatch

    seen = {}
    monkeypatch.setenv(dispatch.ENV_DEPLOYMENT, "gpu")
    monkeypatch.setattr(dispatch, "run_here", lambda *a, **k: pytest.fail("ran inline"))
    monkeypatch.setattr(
        dispatch,
        "dispatch",
        lambda stage, store, target, cfg, refs: seen.update(s=stage.name, t=target, refs=refs),
    )
    dispatch.execute(get("evaluate"), "STORE", get("evaluate").config(), {"problems": "p", "model": "m"})
    assert seen == {"s": "evaluate", "t": "gpu", "refs": {"problems": "p", "model": "m"}}


def test_child_flows_are_derived_from_the_gpu_stages() -> None:
    """One flow per GPU stage, its parameters the store, the stage's input refs (typed as the
    runner declares them) and its config; the fan-out stage also takes `group`."""
    import inspect

    from flows.gpu_stages import STAGE_FLOWS
    from glyph_core.config import EvalConfig, GenerateConfig
    from glyph_core.stages import stages
    from glyph_core.storage import DatasetRef, ModelRef

    assert set(STAGE_FLOWS) == {s.name for s in stages() if s.gpu} == {"generate", "train", "evaluate"}
    evaluate = inspect.signature(STAGE_FLOWS["evaluate"].fn).parameters
    assert list(evaluate) == ["store", "problems", "model", "cfg"]
    assert (evaluate["problems"].annotation, evaluate["model"].annotation) == (DatasetRef, ModelRef)
    assert evaluate["cfg"].annotation is EvalConfig
    generate = inspect.signature(STAGE_FLOWS["generate"].fn).parameters
    assert (
        list(generate) == ["store", "problems", "cfg", "group"]
        and generate["cfg"].annotation is GenerateConfig
    )
    schema = STAGE_FLOWS["train"].parameters.model_dump()
    assert schema["required"] == ["store", "sft", "cfg"]


def test_dispatch_tag_depends_on_parent_stage_and_parameters() -> None:
    from tasks.children import dispatch_tag

    a = dispatch_tag("run-1", "train", {"sft": {"sha256": "x"}})
    assert a == dispatch_tag("run-1", "train", {"sft": {"sha256": "x"}})
    assert a != dispatch_tag("run-2", "train", {"sft": {"sha256": "x"}})
    assert a != dispatch_tag("run-1", "train", {"sft": {"sha256": "y"}})
    assert a != dispatch_tag("run-1", "evaluate", {"sft": {"sha256": "x"}})


# ---------------------------------------------------------------------------------------------
# watcher


def test_fingerprint_local_sees_edits_additions_and_removals(tmp_path: Path) -> None:
    from flows.watcher import diff
    from glyph_core.errors import GlyphError
    from glyph_core.fingerprints import fingerprint_local

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"q": 1}\n')
    first = fingerprint_local(tmp_path, "gsm8k")
    assert first == fingerprint_local(tmp_path, "gsm8k")
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"q": 2}\n')
    edited = fingerprint_local(tmp_path, "gsm8k")
    (tmp_path / "gsm8k" / "test.jsonl").write_text("")
    added = fingerprint_local(tmp_path, "gsm8k")
    assert len({first, edited, added}) == 3
    assert diff({"gsm8k": first, "svamp": "s"}, {"gsm8k": edited, "svamp": "s", "math": "m"}) == (
        ["gsm8k"],
        ["math"],
    )
    with pytest.raises(GlyphError, match="source folder missing"):
        fingerprint_local(tmp_path, "math")


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_watcher_emits_only_on_change(harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.variables import Variable

    from flows import watcher

    emitted: list[dict[str, Any]] = []
    monkeypatch.setattr(watcher, "emit_event", lambda **kw: emitted.append(kw))
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "svamp").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"q": 1}\n')
    (tmp_path / "svamp" / "SVAMP.json").write_text("[]")
    kw = {"sources": ["gsm8k", "svamp"], "data_dir": str(tmp_path), "variable": "glyph_unit_fps"}

    first = watcher.watch_datasets(**kw)
    assert first["new"] == ["gsm8k", "svamp"] and not first["emitted"] and emitted == []
    stored = Variable.get("glyph_unit_fps")
    assert set(stored[watcher.location_key(str(tmp_path))]) == {"gsm8k", "svamp"}

    assert not watcher.watch_datasets(**kw)["emitted"]
    assert emitted == []

    (tmp_path / "svamp" / "SVAMP.json").write_text('[{"ID": "chal-1"}]')
    third = watcher.watch_datasets(**kw)
    assert third["changed"] == ["svamp"] and third["emitted"]
    (event,) = emitted
    assert event["event"] == "glyph.dataset.changed"
    assert event["resource"]["prefect.resource.id"].startswith("glyph.datasets.")
    assert event["payload"]["changed"] == ["svamp"]
    assert not watcher.watch_datasets(**kw)["emitted"], "the new fingerprint was not stored"
