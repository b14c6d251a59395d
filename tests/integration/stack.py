"""Helpers of the integration fixtures: a real Prefect server on SQLite, `glyph deploy`, and real process workers for `cpu` and `gpu`.

Everything lives in one temporary directory per session: PREFECT_HOME (the SQLite database),
the logs, the store, a small copy of the real data (never written into the repository) and the
fault-injection directory of the GPU worker. The server, the workers and everything they start
run in their own process groups and are stopped at the end. On a failing test the tails of the
server and worker logs are printed; all logs are copied to `test-artifacts/integration/`.

Every wait is bounded; the timeouts are generous for a 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "integration"
SHARED_DATA = Path(os.environ.get("GLYPH_DATA_DIR", REPO.parent / "shared" / "data"))

SERVER_START_S = 180
DEPLOY_S = 300
WORKER_START_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 -- local test server
        return resp.status, resp.read().decode()


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} missing)"
    return "\n".join(text[-lines:])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the process group this fixture started, then SIGKILL after a grace period."""
        if not self.alive():
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@dataclass
class Stack:
    root: Path
    api_url: str
    ui_url: str
    env: dict[str, str]
    data_dir: Path
    fault_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def logs(self) -> dict[str, Path]:
        return {name: p.log for name, p in self.procs.items()} | {"deploy": self.root / "deploy.log"}

    def start(self, name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        log = self.root / f"{name}.log"
        fh = open(log, "ab")  # noqa: SIM115 -- owned by the child for its lifetime
        popen = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**self.env, **(extra_env or {})},
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        return proc

    def dump_logs(self, lines: int = 80) -> str:
        out = []
        for name, path in self.logs.items():
            out.append(f"===== {name}: {path} (last {lines} lines) =====\n{tail(path, lines)}")
        return "\n".join(out)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # keep polling; report the last error on timeout
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last_exc!r}" if last_exc else "")
    )


def copy_small_data(dst: Path) -> Path:
    """The upstream layout with the first rows of each real file, in the session's temp dir."""
    if not (SHARED_DATA / "gsm8k" / "train.jsonl").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (set GLYPH_DATA_DIR)")

    def head(src: Path, out: Path, n: int) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(src, encoding="utf-8") as fh:
            out.write_text("".join(line for _, line in zip(range(n), fh, strict=False)), encoding="utf-8")

    for split in ("train", "test"):
        head(SHARED_DATA / "gsm8k" / f"{split}.jsonl", dst / "gsm8k" / f"{split}.jsonl", 20)
        head(SHARED_DATA / "math" / f"{split}.jsonl", dst / "math" / f"{split}.jsonl", 30)
    m500 = SHARED_DATA / "math" / "math500_test.jsonl"
    if m500.is_file():
        head(m500, dst / "math" / "math500_test.jsonl", 500)
    svamp = json.loads((SHARED_DATA / "svamp" / "SVAMP.json").read_text())[:60]
    (dst / "svamp").mkdir(parents=True, exist_ok=True)
    (dst / "svamp" / "SVAMP.json").write_text(json.dumps(svamp))
    return dst


def glyph_cmd(*args: str) -> list[str]:
    """`glyph <args>`; until `deploy` is registered in glyph_cli.main, through its own module."""
    shim = (
        "import sys, typer\n"
        "from glyph_cli import main\n"
        "names = {c.name or c.callback.__name__ for c in main.app.registered_commands}\n"
        "app = main.app\n"
        "if 'deploy' not in names:\n"
        "    from glyph_cli import deploy\n"
        "    app = typer.Typer(); deploy.register(app)\n"
        "app(sys.argv[1:])\n"
    )
    return [sys.executable, "-c", shim, *args]


class settings:
    """Point this process's Prefect client at the session's server."""

    def __init__(self, st: Stack) -> None:
        self.st = st
        self.cm: Any = None

    def __enter__(self) -> None:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self.cm = temporary_settings(updates={PREFECT_API_URL: self.st.api_url})
        self.cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.cm.__exit__(*exc)


def workers_online(st: Stack) -> bool:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for pool in ("cpu", "gpu"):
            workers = client.read_workers_for_work_pool(pool)
            if not any(w.status and w.status.value == "ONLINE" for w in workers):
                return False
    return True
