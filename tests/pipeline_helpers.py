"""Helpers shared by the pipeline flow tests (local store and SeaweedFS).

`harness` starts Prefect's test harness (a temporary SQLite-backed server) once per pytest
process, however many test modules ask for it: a session fixture defined in two modules would
otherwise start two nested harnesses.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tasks.faults import EXEC_LOG_ENV, FAULT_DIR_ENV

_STACK: ExitStack | None = None


@pytest.fixture(scope="session")
def harness(request: pytest.FixtureRequest) -> Iterator[None]:
    global _STACK
    if _STACK is None:
        from prefect.testing.utilities import prefect_test_harness

        _STACK = ExitStack()
        _STACK.enter_context(prefect_test_harness(server_startup_timeout=120))

        def _stop() -> None:
            global _STACK
            if _STACK is not None:
                _STACK.close()
                _STACK = None

        request.addfinalizer(_stop)
    yield None


class ExecLog:
    """Counts real stage executions (cache hits do not run the task body, so they log nothing)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def counts(self) -> Counter[str]:
        if not self.path.exists():
            return Counter()
        return Counter(line for line in self.path.read_text().splitlines() if line)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture
def exec_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ExecLog:
    path = tmp_path / "executions.log"
    monkeypatch.setenv(EXEC_LOG_ENV, str(path))
    monkeypatch.delenv(FAULT_DIR_ENV, raising=False)
    return ExecLog(path)


@contextmanager
def recorded_store(root: Path) -> Iterator[tuple[Path, ExecLog, str]]:
    """For a module-scoped fixture: a few-rows copy of the real data, an execution log that
    counts real stage runs, and a fresh store path, all under `root`; the log's variable is set
    (and fault injection off) until the fixture ends."""
    data = make_tiny_data(real_data_dir(), root / "data")
    log = ExecLog(root / "executions.log")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EXEC_LOG_ENV, str(log.path))
        mp.delenv(FAULT_DIR_ENV, raising=False)
        yield data, log, str(root / "store")


def tiny_overrides(data_dir: Path, **extra: Any) -> dict[str, Any]:
    """The `tiny` profile on the few-rows copy of the real data (conftest's `tiny_data_dir`)."""
    return {"unify.data_dir": str(data_dir), "unify.svamp_holdout": 10, **extra}


def run(store: str, data_dir: Path, refresh: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    from flows.pipeline import pipeline

    t0 = time.perf_counter()
    summary = pipeline(
        profile="tiny", store=store, refresh=refresh, overrides=tiny_overrides(data_dir, **extra)
    )
    summary["wall"] = time.perf_counter() - t0
    return summary


def cached(summary: dict[str, Any]) -> dict[str, bool]:
    return {row["stage"]: row["cached"] for row in summary["stages"]}


def api_env() -> dict[str, str]:
    """Environment for a subprocess that must talk to this process's harness server."""
    from prefect.settings import get_current_settings

    env = dict(os.environ)
    env["PREFECT_API_URL"] = str(get_current_settings().api.url)
    return env


def make_tiny_data(src: Path, dst: Path) -> Path:
    """A few rows of each real file in the upstream layout (as conftest's `tiny_data_dir`, but
    usable from module-scoped fixtures)."""
    import json

    def head(a: Path, b: Path, n: int) -> None:
        b.parent.mkdir(parents=True, exist_ok=True)
        with open(a, encoding="utf-8") as fh:
            b.write_text("".join(line for _, line in zip(range(n), fh, strict=False)), encoding="utf-8")

    for split in ("train", "test"):
        head(src / "gsm8k" / f"{split}.jsonl", dst / "gsm8k" / f"{split}.jsonl", 20)
        head(src / "math" / f"{split}.jsonl", dst / "math" / f"{split}.jsonl", 30)
    head(src / "math" / "math500_test.jsonl", dst / "math" / "math500_test.jsonl", 500)
    (dst / "svamp").mkdir(parents=True, exist_ok=True)
    (dst / "svamp" / "SVAMP.json").write_text(
        json.dumps(json.loads((src / "svamp" / "SVAMP.json").read_text())[:60])
    )
    return dst


def real_data_dir() -> Path:
    path = Path(os.environ.get("GLYPH_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (path / "gsm8k" / "train.jsonl").is_file():
        pytest.skip(f"real data not found at {path} (set GLYPH_DATA_DIR)")
    return path
