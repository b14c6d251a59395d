"""The dataset watcher as deployed (flows/watcher.py): it watches the data location the pipeline
deployment reads, and a source it cannot read ends the run Failed with one line naming it, while
the other sources are still compared and recorded (prefect_test_harness)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pipeline_helpers import harness  # noqa: F401


def _data(root: Path, *sources: str) -> Path:
    files = {"gsm8k": "train.jsonl", "svamp": "SVAMP.json", "math": "train.jsonl"}
    for source in sources:
        (root / source).mkdir(parents=True, exist_ok=True)
        (root / source / files[source]).write_text('{"q": 1}\n')
    return root


def _client() -> Any:
    from prefect import get_client

    return get_client(sync_client=True)


def _logs(flow_run_id: Any) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client() as c:
        return [
            log.message
            for log in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        ]


def test_watcher_watches_the_pipeline_deployments_data(
    harness: None,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.variables import Variable

    from flows import watcher
    from flows.pipeline import pipeline

    data = _data(tmp_path / "data", "gsm8k", "svamp", "math")
    emitted: list[dict[str, Any]] = []
    monkeypatch.setattr(watcher, "emit_event", lambda **kw: emitted.append(kw))
    with _client() as c:
        flow_id = c.create_flow(pipeline)
        c.create_deployment(
            flow_id=flow_id,
            name="ui-watch",
            parameters={
                "profile": "tiny",
                "overrides": {"unify.data_dir": str(data), "unify.sources": ["gsm8k", "math"]},
            },
            enforce_parameter_schema=False,
        )
    kw = {"variable": "glyph_ui_watch", "pipeline_deployment": "glyph-pipeline/ui-watch"}
    first = watcher.watch_datasets(**kw)
    assert first["new"] == ["gsm8k", "math"]  # the pipeline's sources, not all three
    stored = Variable.get("glyph_ui_watch")
    assert list(stored) == [watcher.location_key(str(data))]
    (data / "math" / "train.jsonl").write_text('{"q": 2}\n')
    assert watcher.watch_datasets(**kw)["changed"] == ["math"]
    assert emitted[0]["payload"]["changed"] == ["math"]

    # Without that deployment: the location of the flow's default profile.
    from glyph_core.profiles import load_profile

    default_dir = load_profile(watcher.DEFAULT_PROFILE).stage_config("unify").data_dir  # type: ignore[attr-defined]
    if default_dir is None:
        pytest.skip("the default profile reads the Hub here (no local data)")
    watcher.watch_datasets(variable="glyph_ui_watch_default", pipeline_deployment="glyph-pipeline/none")
    assert list(Variable.get("glyph_ui_watch_default")) == [watcher.location_key(default_dir)]


def test_an_unreadable_source_fails_the_run_with_one_line(
    harness: None,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.variables import Variable

    from flows import watcher

    data = _data(tmp_path / "data", "gsm8k")  # no math folder
    state = watcher.watch_datasets(
        sources=["gsm8k", "math"], data_dir=str(data), variable="glyph_ui_missing", return_state=True
    )
    assert state.is_failed()
    assert state.message.startswith(f"cannot read math in {data}: SourceError: "), state.message
    assert "source folder missing for 'math'" in state.message and "\n" not in state.message
    assert list(Variable.get("glyph_ui_missing")[watcher.location_key(str(data))]) == [
        "gsm8k"
    ]  # still recorded
    logs = _logs(state.state_details.flow_run_id)
    assert not any("Traceback" in m for m in logs), logs

    # A pipeline that reads the Hub, unreachable (a closed port stands in for no network).
    from flows.pipeline import pipeline

    with _client() as c:
        c.create_deployment(
            flow_id=c.create_flow(pipeline),
            name="ui-hub",
            parameters={"profile": "tiny", "overrides": {"unify.data_dir": None}},
            enforce_parameter_schema=False,
        )
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    state = watcher.watch_datasets(
        sources=["svamp"],
        pipeline_deployment="glyph-pipeline/ui-hub",
        variable="glyph_ui_hub",
        return_state=True,
    )
    if not state.is_failed():
        pytest.skip("huggingface_hub answered from a local cache")
    assert state.message.startswith("cannot read svamp on the Hugging Face Hub: "), state.message
    assert "\n" not in state.message
    assert not any("Traceback" in m for m in _logs(state.state_details.flow_run_id))
