"""Headless Chromium through chromedriver's WebDriver protocol (plain HTTP and JSON, no client
library): open a page, wait for what a person would see, read the DOM, take a screenshot.

Used by the UI test (tests/integration/test_deployments.py). The Prefect UI is a single-page
app that draws after its API calls return, so every check is a bounded wait on a JavaScript
predicate, never a fixed sleep.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
DRIVER_NAMES = ("chromedriver", "chromium.chromedriver")


def find(names: tuple[str, ...]) -> str | None:
    return next((p for n in names if (p := shutil.which(n))), None)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """One headless Chromium session (`with Browser(...) as b:`)."""

    def __init__(
        self, chromium: str, driver: str, profile: Path, size: tuple[int, int] = (1440, 1000)
    ) -> None:
        self.port = _port()
        self.log = profile.parent / "chromedriver.log"
        self.proc = subprocess.Popen(
            [driver, f"--port={self.port}", f"--log-path={self.log}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except (OSError, urllib.error.URLError, KeyError):
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise TimeoutError("chromedriver did not start")
            time.sleep(0.3)
        args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--enable-unsafe-swiftshader",  # WebGL in software: the run graph is a canvas
            "--use-angle=swiftshader",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
        ]
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"binary": chromium, "args": args}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 -- local chromedriver
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"webdriver {method} {path}: {exc.read().decode()[:500]}") from None

    def _session(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def script(self, js: str, *args: Any) -> Any:
        """Run `js` (a function body; `arguments[i]` are `args`) in the page; its return value."""
        return self._session("POST", "/execute/sync", {"script": js, "args": list(args)})

    def wait(self, js: str, timeout: float, what: str, *args: Any) -> Any:
        """Until `js` returns something truthy; that value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.script(js, *args)
            except RuntimeError as exc:  # the page is navigating
                last = str(exc)
            if last:
                return last
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {str(last)[:300]})")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))
        return path

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, urllib.error.URLError):
            self._session("DELETE", "")
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
