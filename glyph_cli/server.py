"""`glyph server start|status|stop`: Prefect's own server commands, for this `PREFECT_HOME`.

Why a wrapper at all: `glyph run` wants a lasting server without the person starting one (a
temporary in-process server costs ~11 s per run and takes the run history with it), and three
things Prefect's commands leave to the caller must be right:

- **whose server**: a Prefect API answering on the port may belong to another user or another
  `PREFECT_HOME` (another database). A server is used only if its own settings
  (`GET /api/admin/settings`) name this home; otherwise another port is taken.
- **found however it was started**: `prefect server start` in a terminal, `--background`, or
  `glyph run`: the candidates are `PREFECT_API_URL`, the default address, and the addresses on
  the command lines of the Prefect servers running here (Linux `/proc`).
- **the UI's API address and a clean environment**: the server is started with
  `prefect server start --background` in its own session (a Ctrl-C in the terminal does not
  reach it), with `PREFECT_UI_API_URL` set for the port in use (else the UI of a server on
  :4300 calls :4200), and with a minimal environment: no cloud credentials, tokens or
  `PREFECT_API_*` of the caller reach it.

`stop` is `prefect server stop` (it stops a background server of this home; one started in a
terminal stops with Ctrl-C there).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
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
PID_FILE = "server.pid"
"""Prefect's own (prefect.cli._server_utils.SERVER_PID_FILE_NAME), in `PREFECT_HOME`."""
KEPT_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "SYSTEMROOT", "VIRTUAL_ENV")
KEPT_PREFIXES = ("LC_", "PREFECT_SERVER_", "PREFECT_API_DATABASE_", "PREFECT_UI_", "PREFECT_LOGGING_")
"""What the server's environment keeps: the basics and the server's own settings."""


class ServerError(RuntimeError):
    """The local server could not be started or reached; the message says what to do."""


@dataclass
class ServerInfo:
    api_url: str
    started: bool  # True when this call started it

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")


def prefect_home() -> Path:
    """Prefect's home as Prefect resolves it (env, profile, default `~/.prefect`)."""
    env = os.environ.get("PREFECT_HOME")
    if env:
        return Path(env).expanduser().resolve()
    from prefect.settings import get_current_settings  # ~1 s to import: only when PREFECT_HOME is unset

    return Path(get_current_settings().home).expanduser().resolve()


def api_url_for(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def _get_json(url: str, timeout: float = 2.0) -> object | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 -- a local server
            return json.loads(resp.read()) if resp.status == 200 else None
    except (OSError, urllib.error.URLError, ValueError):
        return None


def healthy(api_url: str) -> bool:
    """A Prefect API answers `/health` with `true` there."""
    return _get_json(f"{api_url.rstrip('/')}/health") is True


def server_home(api_url: str) -> Path | None:
    """The `PREFECT_HOME` of the server answering at `api_url` (from its own settings)."""
    settings = _get_json(f"{api_url.rstrip('/')}/admin/settings")
    home = settings.get("home") if isinstance(settings, dict) else None
    return Path(str(home)).expanduser().resolve() if home else None


def free_port(host: str, port: int) -> int:
    """`port` if nothing listens there, else one the system picks."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        if sock.connect_ex((host, port)) != 0:
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def background_pid(home: Path) -> int | None:
    """The pid in Prefect's pid file of this home, if that process is alive."""
    try:
        pid = int((home / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def running_addresses() -> list[str]:
    """API addresses on the command lines of the Prefect servers running here: `prefect server
    start [--host H] [--port P]` and the uvicorn of `--background` (Linux `/proc`; else none)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = [a.decode(errors="replace") for a in cmdline.read_bytes().split(b"\0")]
        except OSError:
            continue
        text = " ".join(args)
        if "prefect.server.api.server:create_app" in text or ("prefect" in text and "server start" in text):
            get = {k: v for k, v in zip(args, args[1:], strict=False) if k in ("--host", "--port")}
            host = get.get("--host", DEFAULT_HOST)
            if get.get("--port", str(DEFAULT_PORT)).isdigit():
                found.append(
                    api_url_for(
                        "127.0.0.1" if host in ("0.0.0.0", "::") else host,
                        int(get.get("--port", DEFAULT_PORT)),
                    )
                )
    return found


def find_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str | None:
    """The API URL of a running server of this `PREFECT_HOME`, however it was started."""
    home = prefect_home()
    configured = [os.environ["PREFECT_API_URL"]] if os.environ.get("PREFECT_API_URL") else []
    for url in dict.fromkeys([*configured, api_url_for(host, port), *running_addresses()]):
        if healthy(url) and server_home(url) == home:
            return url
    return None


def server_env(home: Path, host: str, port: int) -> dict[str, str]:
    """The server's environment: the basics, its own settings, nothing else of the caller's."""
    env = {k: v for k, v in os.environ.items() if k in KEPT_ENV or k.startswith(KEPT_PREFIXES)}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["DO_NOT_TRACK"] = "1"
    env["PREFECT_HOME"] = str(home)
    env.setdefault(
        "PREFECT_UI_API_URL", api_url_for("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
    )
    return env


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Two `glyph run`s at once must not start two servers on one database."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "glyph-server.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def wait_for_server(home: Path, timeout_s: float) -> str | None:
    """This home's server once it answers; None when its background process is gone or time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and background_pid(home) is not None:
        if url := find_server():
            return url
        time.sleep(0.5)
    return None


def ensure_server(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout_s: float = START_TIMEOUT_S, echo: bool = True
) -> ServerInfo:
    """This home's running (or still starting) server, else `prefect server start --background`
    on `port`, or on a free port when something else holds it."""
    home = prefect_home()
    with _locked(home):
        url = find_server(host, port) or wait_for_server(home, timeout_s)
        if url is not None:
            return ServerInfo(url, started=False)
        if background_pid(home) is not None:  # started in the background, never answered
            stop_server()
        (home / PID_FILE).unlink(missing_ok=True)  # a dead server's: Prefect would refuse to start
        free = free_port(host, port)
        if echo and free != port:
            typer.echo(f"Port {port} is taken by another server or program; using port {free}.")
        if echo:
            typer.echo(f"Starting a Prefect server for PREFECT_HOME={home} at http://{host}:{free} ...")
        t0 = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--background",
                "--host",
                host,
                "--port",
                str(free),
            ],
            env=server_env(home, host, free),
            cwd=home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,  # the server outlives this process and the terminal's Ctrl-C
        )
        if proc.returncode != 0:
            raise ServerError(
                f"`prefect server start --background` failed: {(proc.stdout + proc.stderr).strip()[-800:]}"
            )
        url = wait_for_server(home, timeout_s)
        if url is None:
            raise ServerError(
                f"the Prefect server did not answer on port {free} within {timeout_s:.0f}s; "
                f"run `prefect server start --port {free}` in a terminal to see why"
            )
        if echo:
            typer.echo(f"Prefect server ready after {time.monotonic() - t0:.0f}s.")
        return ServerInfo(url, started=True)


def stop_server() -> str:
    """`prefect server stop` for this home; says what happened."""
    home = prefect_home()
    if background_pid(home) is None and (running := find_server()):
        return f"The Prefect server at {running} was not started in the background; stop it where it runs (Ctrl-C)."
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "server", "stop"],
        env=server_env(home, DEFAULT_HOST, DEFAULT_PORT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (proc.stdout + proc.stderr).strip() or f"`prefect server stop` exited {proc.returncode}"


def server_status() -> str:
    home = prefect_home()
    url = find_server()
    if url is None:
        return f"No Prefect server running for PREFECT_HOME={home} (`glyph server start` starts one)."
    how = "in the background" if background_pid(home) is not None else "in a terminal or by another tool"
    return (
        f"Prefect server for PREFECT_HOME={home}: UI {url.removesuffix('/api')}, API {url} (started {how})."
    )


server_app = typer.Typer(
    help="The local Prefect server (API and UI) that `glyph run` starts on demand: Prefect's own "
    "`prefect server start --background|stop`, for this PREFECT_HOME.",
    no_args_is_help=True,
)


@server_app.command("start")
def _server_start(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = DEFAULT_HOST,
    port: Annotated[
        int, typer.Option(help="Port of the API and the UI (another if it is taken).")
    ] = DEFAULT_PORT,
) -> None:
    """Start this home's server in the background (or find the running one); print its address."""
    try:
        info = ensure_server(host, port)
    except ServerError as exc:
        fail(exc)
    typer.echo(f"Prefect UI: {info.ui_url}")
    typer.echo(f"Use it from this shell: export PREFECT_API_URL={info.api_url}")


@server_app.command("stop")
def _server_stop() -> None:
    """Stop this home's background server (`prefect server stop`)."""
    typer.echo(stop_server())


@server_app.command("status")
def _server_status() -> None:
    """Where this home's server answers, however it was started."""
    typer.echo(server_status())


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")
