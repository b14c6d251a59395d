"""A teacher that cannot do its work fails the generate stage, and nothing is cached.

Before: generate against an endpoint that could not be reached finished with every row an
error, published and cached that table, kept it after the endpoint was fixed (the shards full of
errors were reused for ever), and the run died two stages later with "SFT rows are empty". A
silent endpoint held each request for `timeout_s` x (1 + `max_retries`), twice per shard.

`VllmLike` is a stand-in for `vllm serve --served-model-name` (which cannot run on this CPU):
a real HTTP server speaking the OpenAI routes the backend uses, with vLLM's `root` field in
`/v1/models`. `tests/test_openai_backend.py` runs the backend against `transformers serve`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from glyph_core.config import GenerateConfig, TeacherConfig
from glyph_core.errors import EndpointError, ErrorBudgetExceeded
from glyph_core.generate import generate_shard_group, generate_traces
from glyph_core.generate import key as generate_key
from glyph_core.storage import DatasetRef, Store
from glyph_core.teachers import make_teacher
from tests import fixtures_models as fm
from tests.fixtures_models import free_port, publish_problems, real_problem_rows

store = fm.store  # assigned, not imported, so that test parameters may shadow it

SERVED = "qwen"  # the name clients use
WEIGHTS = "/models/Qwen2.5-7B-Instruct-AWQ"  # what vLLM reports as its root
BOUND_S = 60  # a bound on a failure, not a speed claim


class VllmLike:
    """`mode`: "ok" answers every chat request, an int answers it with that HTTP status."""

    def __init__(self, port: int = 0, mode: str | int = "ok") -> None:
        self.mode = mode
        self.posts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                return None

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                model = {"id": SERVED, "object": "model", "created": 0, "owned_by": "vllm", "root": WEIGHTS}
                self._send(200, {"object": "list", "data": [model]})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.posts += 1
                if outer.mode != "ok":
                    self._send(int(outer.mode), {"error": {"message": "engine is dead"}})
                    return
                text = "🜞 Guideline\n🜆 Plan\n🜂 Step\n🜃 Takeaway\n🝞 42"
                self._send(200, {
                    "id": "c", "object": "chat.completion", "created": 0, "model": SERVED,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17},
                })  # fmt: skip

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers() -> Iterator[list[VllmLike]]:
    made: list[VllmLike] = []
    yield made
    for s in made:
        s.close()


def _cfg(base_url: str, shard_size: int = 2, max_retries: int = 4) -> GenerateConfig:
    teacher = TeacherConfig(
        backend="openai", model=SERVED, base_url=base_url, max_new_tokens=16, max_retries=max_retries
    )
    return GenerateConfig(teacher=teacher, shard_size=shard_size)


def _nothing_published(store: Store, ref: DatasetRef, cfg: GenerateConfig) -> bool:
    return not Path(store.uri("generate", generate_key(cfg, problems=ref))).exists()


def test_unreachable_endpoint_fails_and_a_fixed_one_generates(store: Store, servers: list[VllmLike]) -> None:
    port = free_port()  # closed: nothing listens yet
    ref = publish_problems(store, real_problem_rows(per_source=2))
    cfg = _cfg(f"http://127.0.0.1:{port}/v1", shard_size=2)

    t0 = time.monotonic()
    with pytest.raises(EndpointError) as exc:
        generate_traces(store, ref, cfg)
    assert time.monotonic() - t0 < BOUND_S
    assert str(exc.value) == (
        f"teacher endpoint http://127.0.0.1:{port}/v1 cannot be reached: check that the server is "
        "running and generate.teacher.base_url"
    )
    assert _nothing_published(store, ref, cfg)
    assert not list(Path(store.root).glob("generate/shards/*/data.parquet"))

    servers.append(VllmLike(port))  # the endpoint comes back at the same address
    result = generate_traces(store, ref, cfg)
    assert (result.rows, result.errors, result.shards_generated) == (6, {}, 3)
    assert result.teachers == {f"openai:{WEIGHTS}": 6}  # the weights, not just the served name
    traces = store.read_table(result.ref)
    assert set(traces["teacher"].to_pylist()) == {f"openai:{WEIGHTS}"}


def test_failing_completions_exceed_the_budget_then_the_shards_are_repaired(
    store: Store, servers: list[VllmLike]
) -> None:
    """The endpoint answers `/models` but its engine fails every request (HTTP 500)."""
    server = VllmLike(mode=500)
    servers.append(server)
    ref = publish_problems(store, real_problem_rows(per_source=3))  # 9 problems, 5 shards of 2
    cfg = _cfg(server.base_url, max_retries=0)

    with pytest.raises(ErrorBudgetExceeded) as exc:
        generate_traces(store, ref, cfg)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("generate: 2 of 9 completions failed (InternalServerError x2)")
    assert (
        "generate.max_error_rate=0.02" in message
        and f"teacher openai:{SERVED} at {server.base_url}" in message
    )
    assert "first error: InternalServerError: Error code: 500" in message
    assert server.posts == 2  # stopped after the first shard: no later shard could save the stage
    assert _nothing_published(store, ref, cfg)

    server.mode = "ok"  # the engine is restarted
    result = generate_traces(store, ref, cfg)
    assert result.errors == {} and result.rows == 9
    assert (result.shards_repaired, result.shards_generated, result.shards_reused) == (1, 5, 0)
    assert server.posts == 2 + 9  # the failed pair again, then the 7 never asked
    again = generate_traces(store, ref, cfg)
    assert (again.shards_reused, again.ref) == (5, result.ref)
    assert server.posts == 11


def test_within_the_budget_the_stage_succeeds_and_counts_its_errors(store: Store) -> None:
    """Reference teacher: a problem without a gold answer is an error completion, for good."""
    rows = real_problem_rows(per_source=3)
    rows[4] = {**rows[4], "answer": None}
    ref = publish_problems(store, rows)
    strict = GenerateConfig(teacher=TeacherConfig(backend="reference"), shard_size=4)
    with pytest.raises(
        ErrorBudgetExceeded, match=r"^generate: 1 of 9 completions failed \(ReferenceError x1\)"
    ):
        generate_traces(store, ref, strict)
    assert _nothing_published(store, ref, strict)

    lenient = strict.model_copy(update={"max_error_rate": 0.2})  # out of the key: same shards
    assert generate_key(lenient, problems=ref) == generate_key(strict, problems=ref)
    result = generate_traces(store, ref, lenient)
    assert result.errors == {"ReferenceError": 1} and result.rows == 9
    assert result.shards_repaired == 1 and result.shards_reused == 2
    assert pq.read_table(Path(result.ref.uri))["finish_reason"].to_pylist().count("error") == 1


def test_a_fan_out_worker_stops_at_its_budget(store: Store, servers: list[VllmLike]) -> None:
    server = VllmLike(mode=503)
    servers.append(server)
    ref = publish_problems(store, real_problem_rows(per_source=4))  # 12 problems, 6 shards of 2
    cfg = _cfg(server.base_url, max_retries=0)
    with pytest.raises(ErrorBudgetExceeded, match=r"^generate: 2 of 6 completions failed"):
        generate_shard_group(store, ref, cfg, worker=0, workers=2)  # shards 0, 2, 4
    assert server.posts == 2


class Silent:
    """Accepts connections, never answers: a server stuck while loading its model."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.timeout(180)
def test_silent_endpoint_fails_within_a_minute_with_default_waits(store: Store) -> None:
    silent = Silent()
    try:
        ref = publish_problems(store, real_problem_rows(per_source=1))
        cfg = _cfg(silent.base_url)  # timeout_s=120, max_retries=4: the defaults
        t0 = time.monotonic()
        with pytest.raises(EndpointError) as exc:
            generate_traces(store, ref, cfg)
        elapsed = time.monotonic() - t0
    finally:
        silent.close()
    assert elapsed < BOUND_S, elapsed
    assert str(exc.value).startswith(
        f"teacher endpoint {silent.base_url} accepted the connection but did not answer GET /models within 10 s"
    )
    assert _nothing_published(store, ref, cfg)


def test_refused_key_is_named_by_its_variable_not_its_value(monkeypatch, servers) -> None:
    server = VllmLike()
    servers.append(server)
    server.server.RequestHandlerClass.do_GET = lambda self: self._send(401, {"error": {"message": "bad key"}})
    monkeypatch.setenv("GLYPH_FAULT_KEY", "sk-never-print-me")
    cfg = TeacherConfig(
        backend="openai", model=SERVED, base_url=server.base_url, api_key_env="GLYPH_FAULT_KEY"
    )
    with pytest.raises(EndpointError) as exc:
        make_teacher(cfg)
    assert str(exc.value) == (
        f"teacher endpoint {server.base_url} refused the API key from $GLYPH_FAULT_KEY (HTTP 401): check that key"
    )
