"""The OpenAI-compatible backend against real servers.

* `transformers serve` (a real OpenAI-compatible server) with the tiny random model, offline.
* A small stdlib HTTP server scripted per test for what a model server will not do on demand:
  429 and 5xx answers, a reply slower than the timeout, and a connection closed mid-request.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from glyph_core.config import GenerateConfig, TeacherConfig
from glyph_core.generate import generate_traces
from glyph_core.prompts import messages_for
from glyph_core.storage import Store
from glyph_core.teachers import GenRequest, make_teacher
from tests import fixtures_models as fm
from tests.fixtures_models import free_port, publish_problems, real_problem_rows

# fixtures (assigned, not imported, so that test parameters may shadow them)
store, tiny_model = fm.store, fm.tiny_model

REPO = Path(__file__).resolve().parents[1]
TRANSFORMERS_CLI = shutil.which("transformers") or str(REPO / ".venv" / "bin" / "transformers")


def _reqs(k: int) -> list[GenRequest]:
    return [GenRequest(f"q{i}", messages_for("latent", f"What is {i} + {i}?")) for i in range(k)]


# -- a real server: transformers serve ---------------------------------------------------------


class Served:
    def __init__(self, proc: subprocess.Popen, port: int, model: str) -> None:
        self.proc, self.port, self.model = proc, port, model
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def completed_requests(self) -> int:
        return sum('"POST /v1/chat/completions HTTP/1.1" 200' in line for line in list(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


def start_transformers_serve(model_dir: Path) -> Served:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [TRANSFORMERS_CLI, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--log-level", "info"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served = Served(proc, port, str(model_dir))
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("transformers serve exited:\n" + "".join(served.lines[-30:]))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return served
        except OSError:
            time.sleep(0.2)
    served.stop()
    raise RuntimeError("transformers serve did not come up in 120 s")


@pytest.fixture(scope="module")
def served(tiny_model: Path) -> Iterator[Served]:
    s = start_transformers_serve(tiny_model)
    yield s
    s.stop()


def test_real_server_generates_n_samples_concurrently(served: Served, monkeypatch) -> None:
    monkeypatch.setenv("GLYPH_TEST_KEY", "sk-test-not-logged")
    cfg = TeacherConfig(backend="openai", model=served.model, base_url=served.base_url, api_key_env="GLYPH_TEST_KEY",
                        n=2, max_new_tokens=5, temperature=0.0, concurrency=4, timeout_s=60)  # fmt: skip
    teacher = make_teacher(cfg)
    try:
        out = teacher.generate(_reqs(3), n=2)
    finally:
        teacher.close()
    assert [len(c) for c in out] == [2, 2, 2]
    for comps in out:
        for c in comps:
            assert c.finish_reason == "length", c.error
            assert c.completion_tokens == 5 and c.prompt_tokens > 0
    assert served.completed_requests() >= 6
    assert "sk-test-not-logged" not in repr(teacher)


def test_generate_stage_through_real_server(served: Served, store: Store) -> None:
    ref = publish_problems(store, real_problem_rows(per_source=1))
    teacher = TeacherConfig(backend="openai", model=served.model, base_url=served.base_url,
                            max_new_tokens=4, temperature=0.0, concurrency=2)  # fmt: skip
    result = generate_traces(store, ref, GenerateConfig(teacher=teacher, shard_size=2))
    traces = store.read_table(result.ref)
    assert traces.num_rows == 3 and result.errors == {}
    assert set(traces["teacher"].to_pylist()) == {f"openai:{served.model}"}
    assert result.tokens_per_s > 0


def test_server_killed_mid_run_gives_error_completions(tiny_model: Path) -> None:
    victim = start_transformers_serve(tiny_model)
    cfg = TeacherConfig(backend="openai", model=victim.model, base_url=victim.base_url, max_new_tokens=64,
                        temperature=0.0, concurrency=1, timeout_s=20, max_retries=0)  # fmt: skip
    teacher = make_teacher(cfg)
    killer = threading.Thread(
        target=lambda: (_wait_for(lambda: victim.completed_requests() >= 2), victim.stop())
    )
    killer.start()
    try:
        out = teacher.generate(_reqs(12), n=1)
    finally:
        killer.join(timeout=60)
        victim.stop()
        teacher.close()
    reasons = [c[0].finish_reason for c in out]
    assert reasons.count("error") >= 1 and reasons.count("error") < 12
    assert reasons[0] != "error"
    errors = {c[0].error.split(":")[0] for c in out if c[0].finish_reason == "error"}
    assert errors <= {"APIConnectionError", "APITimeoutError"}, errors


def _wait_for(cond: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.01)


# -- a scripted HTTP server for 429/5xx, slow replies and dropped connections ------------------


def _chat_body(text: str = "🜞 ok") -> bytes:
    return json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }  # fmt: skip
    ).encode()


class Scripted:
    """Answers the i-th POST with `script[i]` (the last entry repeats): an int status, "ok",
    "slow" (sleeps 3 s) or "drop" (closes the socket without answering)."""

    def __init__(self, script: list) -> None:
        self.script = script
        self.seen: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                return None

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.seen.append({"auth": self.headers.get("authorization"), "body": json.loads(body)})
                action = outer.script[min(len(outer.seen) - 1, len(outer.script) - 1)]
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if action == "slow":
                    time.sleep(3)
                    action = "ok"
                status, data = (
                    (200, _chat_body()) if action == "ok" else (action, b'{"error": {"message": "busy"}}')
                )
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("retry-after-ms", "10")
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[[list], Scripted]]:
    made: list[Scripted] = []

    def make(script: list) -> Scripted:
        made.append(Scripted(script))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _teacher(base_url: str, **kw):
    return make_teacher(TeacherConfig(backend="openai", model="m", base_url=base_url, **kw))


def test_429_and_5xx_are_retried(scripted) -> None:
    server = scripted([429, 503, "ok"])
    [[c]] = _teacher(server.base_url, max_retries=3, concurrency=1).generate(_reqs(1))
    assert (c.finish_reason, c.text, c.prompt_tokens, c.completion_tokens) == ("stop", "🜞 ok", 7, 3)
    assert len(server.seen) == 3


def test_retries_exhausted_become_an_error(scripted) -> None:
    server = scripted([500])
    [[c]] = _teacher(server.base_url, max_retries=1, concurrency=1).generate(_reqs(1))
    assert c.finish_reason == "error" and c.error.startswith("InternalServerError")
    assert len(server.seen) == 2


def test_timeout_becomes_an_error(scripted) -> None:
    server = scripted(["slow"])
    t0 = time.monotonic()
    [[c]] = _teacher(server.base_url, timeout_s=0.5, max_retries=0).generate(_reqs(1))
    assert c.finish_reason == "error" and c.error.startswith("APITimeoutError")
    assert time.monotonic() - t0 < 2.5


def test_dropped_connection_is_retried_then_succeeds(scripted) -> None:
    server = scripted(["drop", "ok"])
    [[c]] = _teacher(server.base_url, max_retries=2).generate(_reqs(1))
    assert c.finish_reason == "stop"
    assert len(server.seen) == 2


def test_dropped_connection_without_retries_is_an_error(scripted) -> None:
    server = scripted(["drop"])
    [[c]] = _teacher(server.base_url, max_retries=0).generate(_reqs(1))
    assert c.finish_reason == "error" and c.error.startswith("APIConnectionError")


def test_key_from_env_is_sent_and_never_logged(scripted, monkeypatch, caplog) -> None:
    monkeypatch.setenv("GLYPH_SECRET_KEY", "sk-very-secret-123")
    server = scripted([400])
    caplog.set_level(logging.DEBUG)
    teacher = _teacher(server.base_url, api_key_env="GLYPH_SECRET_KEY", max_retries=0)
    [[c]] = teacher.generate(_reqs(1))
    assert server.seen[0]["auth"] == "Bearer sk-very-secret-123"
    assert c.finish_reason == "error" and "sk-very-secret" not in (c.error or "")
    assert "sk-very-secret" not in caplog.text and "sk-very-secret" not in repr(teacher)


def test_samples_get_distinct_seeds_and_sampling_params(scripted) -> None:
    server = scripted(["ok"])
    out = _teacher(server.base_url, temperature=0.7, top_p=0.9, seed=5, max_new_tokens=33).generate(
        _reqs(2), n=3
    )
    assert [len(c) for c in out] == [3, 3]
    bodies = [s["body"] for s in server.seen]
    assert sorted(b["seed"] for b in bodies) == [5, 5, 6, 6, 7, 7]
    assert {(b["temperature"], b["top_p"], b["max_tokens"]) for b in bodies} == {(0.7, 0.9, 33)}


def test_missing_base_url_is_a_config_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="base_url"):
        TeacherConfig(backend="openai", model="m")


def test_cli_generate_openai_backend(served: Served, tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from glyph_cli.main import app
    from tests.fixtures_models import problems_table

    problems = tmp_path / "problems.parquet"
    pq.write_table(problems_table(real_problem_rows(per_source=1)), problems)
    out = tmp_path / "traces.parquet"
    res = CliRunner().invoke(app, ["generate", "--problems", str(problems), "-o", str(tmp_path),
                                   "--store", str(tmp_path / "st"), "--teacher-backend", "openai",
                                   "--teacher-model", served.model, "--teacher-base-url", served.base_url,
                                   "--teacher-max-new-tokens", "3", "--teacher-temperature", "0",
                                   "--teacher-n", "2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    table = pq.read_table(out)
    assert table.num_rows == 6 and set(table["finish_reason"].to_pylist()) == {"length"}
