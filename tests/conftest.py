"""Shared fixtures: where the real data lives, and a tiny copy of it for fast tests; real S3
servers (SeaweedFS, moto's) and an endpoint that accepts connections and never answers.

The real files are never copied into the repository; `tiny_data_dir` writes a few rows of each
into pytest's temporary directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import SeaweedS3, start_seaweed

from tests.faults.helpers import SilentServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real GSM8K/SVAMP/MATH files: $GLYPH_DATA_DIR, default ../shared/data."""
    path = Path(os.environ.get("GLYPH_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "gsm8k" / "train.jsonl").is_file():
        pytest.skip(f"real data not found at {path} (set GLYPH_DATA_DIR)")
    return path


def _head(src: Path, dst: Path, n: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as fh:
        dst.write_text("".join(line for _, line in zip(range(n), fh, strict=False)), encoding="utf-8")


@pytest.fixture
def tiny_data_dir(data_dir: Path, tmp_path: Path) -> Path:
    """The upstream layout with the first rows of each real file (40 GSM8K, 60 SVAMP, 60 MATH)."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        _head(data_dir / "gsm8k" / f"{split}.jsonl", root / "gsm8k" / f"{split}.jsonl", 20)
        _head(data_dir / "math" / f"{split}.jsonl", root / "math" / f"{split}.jsonl", 30)
    _head(data_dir / "math" / "math500_test.jsonl", root / "math" / "math500_test.jsonl", 500)
    svamp = json.loads((data_dir / "svamp" / "SVAMP.json").read_text())[:60]
    (root / "svamp").mkdir(parents=True)
    (root / "svamp" / "SVAMP.json").write_text(json.dumps(svamp))
    return root


@pytest.fixture(scope="module")
def seaweed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


@pytest.fixture
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()
