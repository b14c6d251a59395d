"""A stage task retries only what a later try can fix: a connection that failed, a request that
timed out, a server that asked to slow down, a crashed GPU child run.

Before: every `StorageError` and every `OSError` was retried, including a store root that is a
file, a read-only store, denied credentials and a damaged artifact, which fail the same way
however often one tries (each retry waiting its back-off first).

The errors below are real ones, raised by the real store against a real file, a closed port
and a silent server; only the throttling answer is built by hand (no S3 server here throttles).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pytest
from botocore.exceptions import ClientError
from prefect.states import Failed

from glyph_core.errors import SourceError, StorageError
from glyph_core.storage import Store
from tasks.caching import is_transient, retry_on_transient
from tasks.children import StageRunCrashed
from tests.faults.helpers import SilentServer, closed_port_url


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("GLYPH_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("GLYPH_S3_MAX_ATTEMPTS", "1")
    return monkeypatch


def _raised(fn) -> BaseException:  # type: ignore[no-untyped-def]
    with pytest.raises(BaseException) as exc:
        fn()
    return exc.value


def _retried(exc: BaseException) -> bool:
    decision = is_transient(exc)
    assert retry_on_transient(None, None, Failed(data=exc)) is decision  # what the task decides
    return decision


def test_errors_that_stay_are_not_retried(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.write_text("a file")
    assert not _retried(_raised(lambda: Store(root).ensure()))  # the root is a file
    store = Store(tmp_path / "ok").ensure()
    (tmp_path / "ok" / "unify").write_text("a file in the way")
    assert not _retried(_raised(lambda: store.write_table(pa.table({"a": [1]}), "unify", "k")))
    assert not _retried(_raised(lambda: store.read_bytes(store.uri("nope"))))  # missing artifact
    assert not _retried(StorageError("x.parquet: content does not match its sha256"))  # damaged
    assert not _retried(PermissionError(errno.EACCES, "Permission denied", "/store"))
    assert not _retried(OSError(errno.ENOSPC, "No space left on device"))
    assert not _retried(FileNotFoundError(errno.ENOENT, "No such file", "model.safetensors"))
    assert not _retried(SourceError("bad row", path="x.jsonl", line=3))


def test_errors_a_later_try_can_fix_are_retried(s3_env: pytest.MonkeyPatch, silent: SilentServer) -> None:
    s3_env.setenv("AWS_ENDPOINT_URL", closed_port_url())
    assert _retried(_raised(lambda: Store("s3://glyph-retry/x", skip_instance_cache=True).ensure()))
    s3_env.setenv("AWS_ENDPOINT_URL", silent.url)
    assert _retried(_raised(lambda: Store("s3://glyph-retry/x", skip_instance_cache=True).ensure()))
    assert _retried(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert _retried(OSError(errno.ETIMEDOUT, "Connection timed out"))
    assert _retried(TimeoutError())
    assert _retried(StageRunCrashed("the child stayed Crashed"))


def test_throttling_is_retried_denial_is_not(s3_env: pytest.MonkeyPatch) -> None:
    s3_env.setenv("AWS_ENDPOINT_URL", "http://s3.example")
    store = Store("s3://glyph-retry/x", skip_instance_cache=True)

    def answer(code: str) -> StorageError:
        return store._explain("read", store.uri("k"), ClientError({"Error": {"Code": code}}, "GetObject"))

    assert _retried(answer("SlowDown")) and _retried(answer("503"))
    assert not _retried(answer("AccessDenied")) and not _retried(answer("NoSuchBucket"))
