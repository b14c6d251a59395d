"""What several fault modules share: a server that accepts connections and never answers, a port
nobody listens on, a data folder with a damaged file, and the real `glyph` command run in a
subprocess with its output counted line by line."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class SilentServer:
    """A real TCP server that accepts every connection and never sends a byte: a hung S3
    gateway or Prefect server, or a port that some other program holds."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def closed_port_url() -> str:
    """An address where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def garbage_data_dir(data_dir: Path, dst: Path) -> tuple[Path, Path]:
    """A copy of the data folder whose GSM8K training file is binary garbage; (folder, file)."""
    shutil.copytree(data_dir, dst)
    bad = dst / "gsm8k" / "train.jsonl"
    bad.write_bytes(bytes(range(128, 256)) * 4)
    return dst, bad


@dataclass
class CliResult:
    code: int
    output: str  # stdout and stderr, as a person sees them in the terminal
    seconds: float

    @property
    def lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.strip()]

    @property
    def errors(self) -> list[str]:
        return [line for line in self.lines if line.startswith("error:")]


def glyph(*args: str, env: dict[str, str | None] | None = None, timeout: float = 300) -> CliResult:
    """`glyph ARGS` in a fresh process, as a user runs it (never a lasting server: GLYPH_SERVER=0
    unless `env` says otherwise; no PREFECT_API_URL or debug inherited from the test run).
    A variable given as None in `env` is removed."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "GLYPH_DEBUG"))}
    full.update({"GLYPH_SERVER": "0", "PYTHONUNBUFFERED": "1"})
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "glyph_cli.main", *args],
        cwd=REPO,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, time.monotonic() - t0)
