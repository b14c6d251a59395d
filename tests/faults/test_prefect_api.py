"""A Prefect API that dies, or stops answering, costs a bounded wait and never a finished
training: the UI's progress and artifacts are best effort, the model is published to the store
before anything that talks to the API can fail the stage, and a rerun reuses it.

Before: the server dying during train made the next progress update raise inside the trainer,
so training failed (the task's retry failed the same way) and nothing was published; a retry
once the server was back trained again from step 1. Prefect's own limits (60 s per request, 5
retries with up to 32 s of back-off) let one call to a silent server take about 7 minutes.

The flow run the dead server was tracking stays Running in its database: nobody is left to
report its end. Prefect 3.9's answer is the flow-run heartbeat (every 180 s by default) and an
automation that marks Crashed a run whose heartbeats stopped (deployments/automations.yaml,
`glyph-crash-zombie-runs`; `glyph deploy` creates it, and `glyph run` on the local server it
starts). The automation acts after 10 minutes, so this test checks the Running record and the
automation's definition, not the transition.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from glyph_core.outputs import StageOutput, StageStats
from glyph_core.storage import Store
from tests.faults.helpers import REPO, closed_port_url, glyph


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrefectServer:
    """A real `prefect server start` (SQLite in its own PREFECT_HOME) that a test can kill with
    SIGKILL, as an OOM killer or a lost machine would, and start again on the same database."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }

    def start(self, timeout: float = 120) -> PrefectServer:
        import httpx

        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(self.port), "--no-services"]  # fmt: skip
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 -- the server keeps writing to it
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"prefect server did not start: {(self.home / 'server.log').read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrefectServer]:
    home = tmp_path / "prefect-home"
    home.mkdir()
    srv = PrefectServer(home).start()
    yield srv
    srv.kill()


def _out(tmp_path: Path) -> tuple[Store, StageOutput]:
    store = Store(tmp_path / "store").ensure()
    import pyarrow as pa

    ref = store.write_table(pa.table({"a": [1, 2]}), "filter", "k")
    return store, StageOutput(stage="filter", key="k", refs={"kept": ref}, stats=StageStats(rows_in=2))


def test_progress_and_artifacts_survive_a_dead_api(tmp_path: Path) -> None:
    """Each is a Prefect API call for the UI: a dead server is a warning, the stage goes on, and
    progress stops calling after the first failure (one bounded wait, not one per step)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.artifacts import ProgressArtifact, publish_stage

    store, out = _out(tmp_path)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    # Our own handler on the module's logger: Prefect may reconfigure the root logger's handlers.
    logging.getLogger("tasks.artifacts").addHandler(handler)
    with temporary_settings(updates={PREFECT_API_URL: f"{closed_port_url()}/api"}):
        progress = ProgressArtifact("train", every_s=0)
        progress(1, 100)
        assert progress.broken
        t0 = time.monotonic()
        for step in range(2, 101):
            progress(step, 100)
        assert time.monotonic() - t0 < 1.0  # no more calls once the API failed
        publish_stage(store, out)
    logging.getLogger("tasks.artifacts").removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelname == "WARNING"]
    assert any(m.startswith("train progress: the Prefect API call failed (ConnectError") for m in warnings)
    assert any(m.startswith("filter artifacts: the Prefect API call failed (ConnectError") for m in warnings)


def test_glyph_run_bounds_every_api_call() -> None:
    """`glyph run` sets a request timeout and retry count where the user has not (env wins)."""
    code = (
        "from glyph_cli.pipeline import prefect_defaults; prefect_defaults();"
        "from prefect.settings import get_current_settings as g; s = g();"
        "print(s.api.request_timeout, s.client.max_retries)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_REQUEST", "PREFECT_CLIENT"))}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert run.stdout.split() == ["30.0", "3"], run.stderr
    env["PREFECT_API_REQUEST_TIMEOUT"] = "90"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert run.stdout.split() == ["90.0", "3"], run.stderr


def test_the_zombie_run_automation_is_defined_for_glyph_flows() -> None:
    from glyph_cli.deploy import load_automations
    from glyph_cli.pipeline import AUTOMATIONS_FILE, ZOMBIE_AUTOMATION

    automation = {a.name: a for a in load_automations(AUTOMATIONS_FILE)}[ZOMBIE_AUTOMATION]
    trigger = automation.trigger
    assert trigger.posture.value == "Proactive" and trigger.after == {"prefect.flow-run.heartbeat"}
    assert {
        "prefect.flow-run.heartbeat",
        "prefect.flow-run.Completed",
        "prefect.flow-run.Failed",
    } <= trigger.expect
    assert trigger.within.total_seconds() == 600 and trigger.for_each == {"prefect.resource.id"}
    assert "glyph-pipeline" in trigger.match_related.root["prefect.resource.name"]
    (action,) = automation.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_dying_mid_train_loses_no_training(tmp_path: Path, server: PrefectServer) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    store = tmp_path / "store"
    env: dict[str, str | None] = {"PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(server.home)}
    killed: list[float] = []

    def kill_before_training() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if list(store.glob("rewrite/*/sft.parquet")):  # rewrite done: train is next
                server.kill()
                killed.append(time.monotonic())
            time.sleep(0.05)

    threading.Thread(target=kill_before_training, daemon=True).start()
    args = ("run", "-q", "--store", str(store), "--set", "train.max_steps=4")
    res = glyph(*args, env=env, timeout=800)
    assert killed, res.output
    assert (
        res.code != 0 and res.errors and res.errors[-1].startswith(f"error: the Prefect API at {server.url}")
    ), res.output

    # The training finished and was published, although every API call after the kill failed.
    (model_dir,) = store.glob("train/*/model")
    from glyph_core.train import published

    key = model_dir.parent.name
    assert published(Store(store), key) is not None
    stamp = (model_dir / "manifest.json").stat().st_mtime_ns

    # The server comes back on the same database: the run it lost is still Running there.
    server.start()
    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        runs = client.read_flow_runs()
    assert [r.state_type.value for r in runs] == ["RUNNING"]

    # A rerun takes the published model instead of training again, and completes.
    again = glyph("run", "--json", "-q", "--store", str(store), "--set", "train.max_steps=4", env=env)
    assert again.code == 0, again.output
    summary = json.loads(again.output[again.output.index("{") :])
    train_row = next(r for r in summary["stages"] if r["stage"] == "train")
    assert train_row["key"] == key
    assert (model_dir / "manifest.json").stat().st_mtime_ns == stamp  # not published again
    assert not (store / "_work" / "train" / key).exists()


def test_glyph_run_creates_the_zombie_automation_once(server: PrefectServer) -> None:
    """On the local server `glyph run` starts; a real server accepts the definition."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from glyph_cli.pipeline import ZOMBIE_AUTOMATION, ensure_zombie_automation

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        assert ensure_zombie_automation() is True
        assert ensure_zombie_automation() is False  # one query on every later run, no duplicate
        with get_client(sync_client=True) as client:
            (automation,) = client.read_automations_by_name(ZOMBIE_AUTOMATION)
    assert automation.enabled and automation.trigger.within.total_seconds() == 600
