"""What the UI shows, rendered without a server (glyph_core/reports.py), the flow's typed
parameters as Prefect publishes them for the form, and `glyph server` against real Prefect
servers (docs/ui.md).

The evaluation artifacts are built by the real scoring and aggregation code from hand-written
completions (tests/test_report.py's `_fake_run`), so the renderings read exactly what a run
leaves behind.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from glyph_core.eval_report import headline_lines, markdown_report
from glyph_core.outputs import StageOutput, StageStats
from glyph_core.reports import evaluation_report, stage_markdown, training_report
from glyph_core.storage import Store
from tests.test_report import KEY, _fake_run

REPO = Path(__file__).resolve().parents[1]
DATA_URL = re.compile(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def _evaluate_output(summary: dict) -> StageOutput:
    st = Store(summary["store"])
    table = st.uri("evaluate", KEY, "table.parquet")
    from glyph_core.outputs import ref_of

    return StageOutput(
        stage="evaluate",
        key=KEY,
        refs={"table": ref_of(st, table), "completions": ref_of(st, table)},
        stats=StageStats(
            rows_in=4,
            rows_out=8,
            seconds=1.5,
            extra={
                "metrics": st.uri("evaluate", KEY, "metrics.json"),
                "plot": st.uri("evaluate", KEY, "emergence_accuracy.png"),
                "n_problems": 4,
                "config": {"a": 1},
            },
        ),
    )


def test_evaluation_document_is_eval_reports_rendering_with_the_plot_inline(tmp_path: Path) -> None:
    summary = _fake_run(tmp_path / "store")
    st = Store(summary["store"])
    out = _evaluate_output(summary)
    metrics = json.loads(st.read_bytes(out.stats.extra["metrics"]))
    report = evaluation_report(st, out)

    assert report.headline == headline_lines(metrics)
    (doc,) = report.documents
    assert doc.key == "evaluation" and doc.table is None
    md = doc.markdown or ""
    assert markdown_report(metrics, original_study=True).strip() in md
    (encoded,) = DATA_URL.findall(md)
    png = base64.b64decode(encoded)
    assert png == st.read_bytes(out.stats.extra["plot"]) and png.startswith(b"\x89PNG")
    assert len(md.encode()) < 120_000, "keep the artifact well under the API's limits"
    assert "file://" not in md


def test_stage_markdown_shows_paths_as_text_and_says_cached(tmp_path: Path) -> None:
    summary = _fake_run(tmp_path / "store")
    out = _evaluate_output(summary)
    ran = stage_markdown(out, cached=False)
    cached = stage_markdown(out, cached=True)
    assert ran.startswith("### evaluate: ran in 1.5 s") and cached.startswith("### evaluate: Cached")
    for md in (ran, cached):
        assert f"`{out.refs['table'].uri}`" in md and "file://" not in md
        assert "| n_problems | `4` |" in md
        assert "config" not in md  # dicts stay in the stage's files, not in the artifact


def test_training_report_is_the_metrics_table_and_a_loss_curve(tmp_path: Path) -> None:
    st = Store(tmp_path / "store").ensure()
    rows = [
        {"step": 1, "epoch": 0.5, "loss": 2.0, "learning_rate": 1e-3, "tokens_per_s": 100.0},
        {"step": 2, "epoch": 1.0, "loss": 1.5, "learning_rate": 5e-4, "tokens_per_s": math.nan},
    ]
    metrics = st.write_table(pa.Table.from_pylist(rows), "train", "k", "metrics.parquet")
    out = StageOutput(stage="train", key="k", refs={"metrics": metrics}, stats=StageStats())
    report = training_report(st, out)

    assert report.headline == ["train: 2 steps, loss 2.0000 → 1.5000, 100 tokens/s"]
    (doc,) = report.documents
    assert doc.key == "train-metrics"
    assert [(r["step"], r["loss"], r["tokens_per_s"]) for r in doc.table or []] == [
        (1, 2.0, 100.0),
        (2, 1.5, None),
    ]
    (encoded,) = DATA_URL.findall(report.markdown)
    assert base64.b64decode(encoded).startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------
# the flow's parameters, as the UI's form gets them


def test_flow_parameters_are_typed_for_the_form() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import DEFAULT_PROFILE, pipeline
    from glyph_core.profiles import PROFILES
    from glyph_core.stages import names

    props = parameter_schema(pipeline.fn).model_dump()["properties"]
    assert props["profile"]["enum"] == list(PROFILES) and props["profile"]["default"] == DEFAULT_PROFILE
    # No `| None` anywhere: the form offers the input itself (a multi-select, a JSON editor).
    assert props["refresh"]["type"] == "array" and props["refresh"]["items"]["enum"] == [*names(), "all"]
    assert props["overrides"]["type"] == "object" and props["overrides"]["examples"]
    assert "glyph run --set" in props["overrides"]["description"]
    assert props["store"]["type"] == "string" and props["changed_sources"]["type"] == "array"
    assert not any("anyOf" in p for p in props.values())
    # A Python caller's None still means "not given" (Prefect validates every call's parameters).
    given = pipeline.validate_parameters({"store": None, "refresh": None, "overrides": None})
    assert (given["store"], given["refresh"], given["overrides"]) == ("", [], {})
    # One default: the deployment sets none, so Run in the UI starts from the flow's.
    (deployment,) = [
        d
        for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
        if d["entrypoint"] == "flows/pipeline.py:pipeline"
    ]
    assert "profile" not in (deployment.get("parameters") or {})
    (trigger,) = deployment["triggers"]
    assert trigger["parameters"] == {"changed_sources": "{{ event.payload.changed }}"}


# ---------------------------------------------------------------------------------------------
# glyph server


def test_server_environment_is_minimal_and_points_the_ui_at_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from glyph_cli.server import server_env

    for name, value in {
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "HF_TOKEN": "hf_x",
        "OPENAI_API_KEY": "sk",
        "PREFECT_API_KEY": "pnu",
        "PREFECT_API_URL": "http://other:4200/api",
        "PREFECT_SERVER_DATABASE_TIMEOUT": "30",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PREFECT_UI_API_URL", raising=False)
    env = server_env(Path("/tmp/home"), "127.0.0.1", 4300)
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4300/api"
    assert env["PREFECT_HOME"] == "/tmp/home" and env["PREFECT_SERVER_DATABASE_TIMEOUT"] == "30"
    assert not {
        "AWS_SECRET_ACCESS_KEY",
        "HF_TOKEN",
        "OPENAI_API_KEY",
        "PREFECT_API_KEY",
        "PREFECT_API_URL",
    } & set(env)
    assert "s3cr3t" not in json.dumps(env)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_server_of_another_home_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server started in a terminal (`prefect server start`) is found for its own home only;
    another home gets its own server, in the background, on another port, without the
    caller's secrets; `status` and `stop` find it."""
    from glyph_cli import server

    port = _free_port()
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    foreground = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**env, "PREFECT_HOME": str(home_a), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    try:
        monkeypatch.setenv("PREFECT_HOME", str(home_a))
        deadline = time.monotonic() + 180
        while server.find_server(port=port) is None:
            assert foreground.poll() is None and time.monotonic() < deadline, (
                "the terminal server did not start"
            )
            time.sleep(1)
        assert server.find_server(port=port) == f"http://127.0.0.1:{port}/api"
        assert "in a terminal" in server.server_status()
        assert "stop it where it runs" in server.stop_server()

        monkeypatch.setenv("PREFECT_HOME", str(home_b))
        assert server.find_server(port=port) is None  # healthy, but home a's
        info = server.ensure_server(port=port, echo=False)
        try:
            assert info.started and info.api_url != f"http://127.0.0.1:{port}/api"
            assert server.server_home(info.api_url) == home_b.resolve()
            pid = int((home_b / "server.pid").read_text())
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"s3cr3t" not in environ and f"PREFECT_UI_API_URL={info.api_url}".encode() in environ
            assert server.ensure_server(port=port, echo=False) == server.ServerInfo(
                info.api_url, started=False
            )
            assert info.api_url in server.server_status() and "in the background" in server.server_status()
        finally:
            assert "stopped" in server.stop_server().lower()
        deadline = time.monotonic() + 30
        while server.healthy(info.api_url) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not server.healthy(info.api_url)
        assert "No Prefect server running" in server.server_status()
    finally:
        os.killpg(foreground.pid, 15)
        foreground.wait(30)


def test_a_stale_pid_file_does_not_block_a_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect refuses `--background` while its pid file exists: the file of a server that died
    is gone before `prefect server start --background` runs (which is faked here: it only
    records what it saw), and `stop` clears one too (Prefect's own `server stop`)."""
    from glyph_cli import server

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(server, "find_server", lambda *a, **k: None)
    (tmp_path / "server.pid").write_text(str(gone.pid))
    assert server.background_pid(tmp_path) is None
    seen: list[bool] = []

    def fake_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        seen.append((tmp_path / "server.pid").exists())
        return subprocess.CompletedProcess(cmd, 1, "", "stop here")

    monkeypatch.setattr(server.subprocess, "run", fake_run)
    with pytest.raises(server.ServerError, match="stop here"):
        server.ensure_server(port=_free_port(), echo=False)
    assert seen == [False]
    monkeypatch.undo()
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    (tmp_path / "server.pid").write_text(str(gone.pid))
    assert "stale PID file" in server.stop_server()
    assert not (tmp_path / "server.pid").exists()


def test_a_cached_stage_without_a_recorded_origin_says_so(tmp_path: Path) -> None:
    """No `_origins/<stage>/<key>.json` (computed by a `glyph <stage>` command or before origins
    were recorded): the note says the artifact is not known here, without asking the API."""
    from tasks.artifacts import cached_note, origin_uri

    st = Store(tmp_path / "store").ensure()
    assert not st.exists(origin_uri(st, "train", "k"))
    assert cached_note(st, "train", "k").startswith(
        "Computed by an earlier run whose artifact is not on this server"
    )
