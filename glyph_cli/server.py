"""A local Prefect server started on demand and kept running between CLI calls.

Why: without `PREFECT_API_URL`, Prefect starts a temporary server inside every process that
runs a flow, which costs ~11 s on a 2-core machine and takes the run history away with it when
the process exits. So `glyph run` does what a Prefect user would do by hand, once: it starts
`prefect server start` in the background (its own session, log file and pid file under
`PREFECT_HOME`), waits for `/api/health`, points `PREFECT_API_URL` at it, and later calls reuse
it. The person can open the UI at the same address and see the same runs.
`glyph server stop` ends it.

State lives in `PREFECT_HOME` (default `~/.prefect`) because that is where the server keeps its
SQLite database: one home, one server, one run history.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from glyph_cli.common import fail
from glyph_core.pids import pid_alive

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
START_TIMEOUT_S = 180.0
"""A first start on a slow 2-core machine creates the database and runs migrations (~15–40 s)."""


class ServerError(RuntimeError):
    """The local server could not be started or reached; the message says what to do."""


@dataclass
class ServerInfo:
    host: str
    port: int
    pid: int | None
    started: bool  # True when this call started it

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def prefect_home() -> Path:
    """Prefect's home as Prefect resolves it (env, profile, default `~/.prefect`)."""
    env = os.environ.get("PREFECT_HOME")
    if env:
        return Path(env).expanduser()
    try:
        from prefect.settings import get_current_settings  # ~1 s to import: only when PREFECT_HOME is unset

        return Path(get_current_settings().home).expanduser()
    except Exception:  # pragma: no cover - prefect missing or settings unreadable
        return Path("~/.prefect").expanduser()


def _paths(home: Path) -> dict[str, Path]:
    return {
        "state": home / "glyph-server.json",
        "log": home / "glyph-server.log",
        "lock": home / "glyph-server.lock",
    }


def healthy(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when a Prefect API answers `/api/health` with `true` at that address."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/api/health", timeout=timeout) as resp:
            return resp.status == 200 and resp.read().strip() == b"true"
    except (OSError, urllib.error.URLError, ValueError):
        return False


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    if not pid_alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # a recycled pid must not be mistaken for our server
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        return b"prefect" in b" ".join(args) and b"server" in args
    return True


def read_state(home: Path) -> dict[str, object] | None:
    try:
        data = json.loads(_paths(home)["state"].read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Two `glyph run`s at once must not start two servers on one database."""
    home.mkdir(parents=True, exist_ok=True)
    with open(_paths(home)["lock"], "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def ensure_server(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    timeout_s: float = START_TIMEOUT_S,
    echo: bool = True,
) -> ServerInfo:
    """The running glyph-started server of this PREFECT_HOME, else a new one on `port`.

    A healthy Prefect server already listening on `port` (one the person started with
    `prefect server start`) is reused as is. If something else holds the port, a free port is
    picked and printed rather than failing, so the demo still runs.
    """
    home = prefect_home()
    paths = _paths(home)
    with _locked(home):
        state = read_state(home)
        if state is not None:
            pid = int(str(state.get("pid", 0)))
            s_host, s_port = str(state.get("host", host)), int(str(state.get("port", port)))
            if _alive(pid) and healthy(s_host, s_port):
                return ServerInfo(s_host, s_port, pid, started=False)
            if _alive(pid):  # running but not answering: a crashed start; replace it
                _terminate(pid)
            paths["state"].unlink(missing_ok=True)
        if healthy(host, port):
            if echo:
                typer.echo(f"Using the Prefect server already running at http://{host}:{port}")
            return ServerInfo(host, port, None, started=False)
        if port_in_use(host, port):
            taken = port
            port = free_port(host)
            if echo:
                typer.echo(
                    f"Port {taken} on {host} is taken by something that is not a Prefect server; "
                    f"starting the Prefect server on port {port} instead."
                )
        return _start(home, host, port, timeout_s, echo)


def _start(home: Path, host: str, port: int, timeout_s: float, echo: bool) -> ServerInfo:
    paths = _paths(home)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    env["PREFECT_HOME"] = str(home)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    if echo:
        typer.echo(
            f"Starting a local Prefect server at http://{host}:{port} (log {paths['log']}); "
            "later runs reuse it, `glyph server stop` ends it."
        )
    with open(paths["log"], "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # survives this process and the terminal's Ctrl-C
        )
    state = {"pid": proc.pid, "host": host, "port": port, "started_at": time.time(), "cmd": cmd}
    paths["state"].write_text(json.dumps(state))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            paths["state"].unlink(missing_ok=True)
            raise ServerError(
                f"the Prefect server exited with code {proc.returncode} during start-up; "
                f"log {paths['log']}:\n{_tail(paths['log'])}"
            )
        if healthy(host, port):
            t = time.monotonic() - (deadline - timeout_s)
            if echo:
                typer.echo(f"Prefect server ready after {t:.0f}s.")
            return ServerInfo(host, port, proc.pid, started=True)
        time.sleep(0.5)
    _terminate(proc.pid)
    paths["state"].unlink(missing_ok=True)
    raise ServerError(
        f"the Prefect server did not answer http://{host}:{port}/api/health within {timeout_s:.0f}s; "
        f"log {paths['log']}:\n{_tail(paths['log'])}"
    )


def _terminate(pid: int, timeout_s: float = 20.0) -> bool:
    """SIGTERM the server's process group (uvicorn and its children), SIGKILL after a wait."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return False


def stop_server() -> str:
    """Stop the server glyph started for this PREFECT_HOME; a message says what happened."""
    home = prefect_home()
    with _locked(home):
        state = read_state(home)
        if state is None:
            return f"No glyph-started Prefect server for PREFECT_HOME={home}."
        pid = int(str(state.get("pid", 0)))
        where = f"http://{state.get('host')}:{state.get('port')}"
        _paths(home)["state"].unlink(missing_ok=True)
        if not _alive(pid):
            return f"The Prefect server at {where} (pid {pid}) was not running; state cleared."
        clean = _terminate(pid)
        return f"Stopped the Prefect server at {where} (pid {pid}{'' if clean else ', killed'})."


def server_status() -> str:
    home = prefect_home()
    state = read_state(home)
    if state is None:
        return f"No glyph-started Prefect server for PREFECT_HOME={home}."
    pid = int(str(state.get("pid", 0)))
    host, port = str(state.get("host")), int(str(state.get("port")))
    ok = _alive(pid) and healthy(host, port)
    status = "running" if ok else "not answering"
    return f"Prefect server {status}: http://{host}:{port} (pid {pid}, log {_paths(home)['log']})"


server_app = typer.Typer(
    help="The local Prefect server (API and UI) that `glyph run` starts on demand.",
    no_args_is_help=False,
    invoke_without_command=True,
)


@server_app.callback()
def _server_default(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to bind (foreground mode).")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port of the API and the UI (foreground mode).")] = DEFAULT_PORT,
) -> None:
    """Without a subcommand: run a Prefect server in the foreground (Ctrl-C stops it)."""
    if ctx.invoked_subcommand is not None:
        return
    typer.echo(f"After it starts: prefect config set PREFECT_API_URL=http://{host}:{port}/api; glyph deploy")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd))


@server_app.command("start")
def _server_start(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port of the API and the UI.")] = DEFAULT_PORT,
) -> None:
    """Start the server in the background (or find the running one) and print its address."""
    try:
        info = ensure_server(host, port)
    except ServerError as exc:
        fail(exc)
    typer.echo(f"Prefect UI: {info.ui_url}   (PREFECT_API_URL={info.api_url})")


@server_app.command("stop")
def _server_stop() -> None:
    """Stop the background server that `glyph run` or `glyph server start` started."""
    typer.echo(stop_server())


@server_app.command("status")
def _server_status() -> None:
    """Show whether the background server runs, where, and its log file."""
    typer.echo(server_status())


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")
