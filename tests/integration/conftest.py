"""Fixtures: a real Prefect server on SQLite, `glyph deploy`, process workers for `cpu` and `gpu`.

See `stack.py` for what lives where; everything is torn down at the end of the session and the
logs are kept in `test-artifacts/integration/`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .stack import (
    ARTIFACTS,
    DEPLOY_S,
    REPO,
    SERVER_START_S,
    WORKER_START_S,
    Stack,
    copy_small_data,
    free_port,
    get,
    glyph_cmd,
    settings,
    tail,
    wait_until,
    workers_online,
)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Server + `glyph deploy` + one process worker per pool; torn down at the end."""
    if os.environ.get("PREFECT_API_KEY"):
        pytest.skip("PREFECT_API_KEY is set: refusing to run against Prefect Cloud")
    root = tmp_path_factory.mktemp("prefect-it")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    data_dir = copy_small_data(root / "data")
    fault_dir = root / "faults"
    fault_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(root / "home"),
            "PREFECT_API_URL": api_url,
            "PREFECT_UI_API_URL": api_url,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_TELEMETRY_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            "PYTHONPATH": str(REPO),  # workers run this checkout, even if another is installed
            "PYTHONUNBUFFERED": "1",
            "GLYPH_DATA_DIR": str(data_dir),
            "GLYPH_DISPATCH_POLL_S": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    st = Stack(
        root=root,
        api_url=api_url,
        ui_url=api_url.removesuffix("/api"),
        env=env,
        data_dir=data_dir,
        fault_dir=fault_dir,
    )
    failed = False
    try:
        server = st.start(
            "server",
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        )

        def healthy() -> bool:
            if not server.alive():
                raise RuntimeError(f"server exited:\n{tail(server.log)}")
            return get(f"{api_url}/health")[0] == 200

        wait_until(healthy, SERVER_START_S, "the Prefect server's /api/health")

        t0 = time.monotonic()
        deploy = subprocess.run(
            glyph_cmd("deploy"), cwd=REPO, env=env, capture_output=True, text=True, timeout=DEPLOY_S
        )
        (root / "deploy.log").write_text(deploy.stdout + "\n--- stderr ---\n" + deploy.stderr)
        assert deploy.returncode == 0, f"glyph deploy failed:\n{deploy.stdout}\n{deploy.stderr}"
        print(f"\nglyph deploy took {time.monotonic() - t0:.1f}s")

        for pool, extra in {
            "cpu": {"GLYPH_CRASH_GRACE_S": "120"},
            "gpu": {"GLYPH_FAULT_DIR": str(fault_dir)},
        }.items():
            st.start(
                f"worker-{pool}",
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "worker",
                    "start",
                    "--pool",
                    pool,
                    "--type",
                    "process",
                    "--name",
                    f"it-{pool}",
                ],
                extra,
            )
        with settings(st):
            wait_until(lambda: workers_online(st), WORKER_START_S, "both workers to be online", 2)
        yield st
    except BaseException:
        failed = True
        raise
    finally:
        for proc in reversed(list(st.procs.values())):
            proc.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for name, path in st.logs.items():
            if path.exists():
                shutil.copy(path, ARTIFACTS / f"{name}.log")
        if failed:
            print(st.dump_logs())


@pytest.fixture
def api(stack: Stack) -> Iterator[Stack]:
    """The stack, with this process's Prefect client pointed at it."""
    with settings(stack):
        yield stack


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed and "stack" in getattr(item, "funcargs", {}):
        st: Stack = item.funcargs["stack"]
        rep.sections.append(("prefect server and worker logs", st.dump_logs()))
