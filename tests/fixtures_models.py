"""Shared fixtures for the teacher and generate tests: models, real problem rows, a store.

Import into a test module with `from tests.fixtures_models import *` (or list this module in
`pytest_plugins` of tests/conftest.py). Models are built once per machine in the glyph model
cache (`GLYPH_MODEL_CACHE`, default ~/.cache/glyph/models), so only the first run pays for the
SmolLM2 conversion (~25 s).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from glyph_core.storage import DatasetRef, Store

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA_DIR.is_dir():  # the checkout may live elsewhere; /work/shared is the known place
    DATA_DIR = Path("/work/shared/data")

PROBLEM_COLUMNS = ("id", "source", "split", "question", "solution", "answer", "level", "type")


def real_problem_rows(per_source: int = 4, split: str = "train") -> list[dict[str, Any]]:
    """The first rows of each source from the real files, in the unified column layout.

    SVAMP has no upstream split (unify assigns its hold-out), so its rows are labelled `split`.
    """
    from glyph_core.sources import load_local

    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR}")
    rows: list[dict[str, Any]] = []
    for source in ("gsm8k", "svamp", "math"):
        records = [r for r in load_local(source, DATA_DIR) if r["split"] in (split, None)]
        for r in records[:per_source]:
            rows.append({**{k: r.get(k) for k in PROBLEM_COLUMNS}, "split": split})
    return rows


def problems_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows)


def publish_problems(store: Store, rows: list[dict[str, Any]], key: str = "test") -> DatasetRef:
    return store.write_table(problems_table(rows), "unify", key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from glyph_core.models import tiny_model_dir

    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_qwen2() -> Path:
    from glyph_core.models import tiny_model_dir

    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from glyph_core.models import smollm2_dir

    return smollm2_dir()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")
