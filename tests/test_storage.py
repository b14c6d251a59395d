"""`glyph_core.storage` on a local directory, moto's S3 server and a real SeaweedFS (docs/design.md, "Storage").

The property that matters most: a write that fails or is interrupted leaves nothing a later
run trusts: no object at the final name, no model directory without its manifest, and any
content that does not match its recorded hash is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import SeaweedS3

from glyph_core.errors import StorageError
from glyph_core.storage import MANIFEST, DatasetRef, ModelRef, Store, stage_key

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    if request.param == "local":
        return Store(tmp_path / "store").ensure()
    if request.param == "moto":
        endpoint = request.getfixturevalue("moto_server")
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": endpoint,
        }
    else:
        server: SeaweedS3 = request.getfixturevalue("seaweed_server")
        env = server.client_env()
    for k, v in {**env, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])
    bucket = f"glyph-{uuid.uuid4().hex[:10]}"
    return Store(f"s3://{bucket}/prefix", skip_instance_cache=True).ensure()


def _table(n: int = 5) -> pa.Table:
    return pa.table({"id": [f"p{i}" for i in range(n)], "x": list(range(n))})


def test_write_read_roundtrip_hashes_the_published_bytes(store: Store) -> None:
    ref = store.write_table(_table(), "unify", "k1", "problems.parquet")
    assert ref.rows == 5 and ref.uri == store.uri("unify", "k1", "problems.parquet")
    assert hashlib.sha256(store.read_bytes(ref.uri)).hexdigest() == ref.sha256
    assert store.read_table(ref).equals(_table())
    store.verify(ref)


def test_same_content_under_another_key_has_the_same_sha(store: Store) -> None:
    a = store.write_table(_table(), "unify", "a")
    b = store.write_table(_table(), "unify", "b")
    assert a.uri != b.uri and a.sha256 == b.sha256


def test_tampered_or_missing_content_is_refused(store: Store) -> None:
    ref = store.write_table(_table(), "filter", "k")
    store.publish_bytes(ref.uri, store.read_bytes(ref.uri)[:-8] + b"tampered")
    with pytest.raises(StorageError, match="sha256"):
        store.read_table(ref)
    with pytest.raises(StorageError):
        store.verify(ref)
    missing = DatasetRef(uri=store.uri("filter", "nope", "data.parquet"), sha256=ref.sha256, rows=5)
    with pytest.raises(StorageError, match="not found"):
        store.read_table(missing)


def test_failed_write_publishes_nothing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = store.uri("rewrite", "k", "sft.parquet")
    if store.is_local:
        import glyph_core.storage as storage

        def boom(src: str, dst: str) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(storage.os, "replace", boom)
    else:

        def boom_pipe(path: str, data: bytes, **kw: object) -> None:
            raise OSError("connection reset")

        monkeypatch.setattr(store.fs, "pipe_file", boom_pipe)
    with pytest.raises(StorageError, match="could not write"):
        store.write_table(_table(), "rewrite", "k", "sft.parquet")
    monkeypatch.undo()
    assert not store.exists(uri)
    if store.is_local:  # and no temp file is left behind by a failure that raised
        assert list(Path(uri).parent.iterdir()) == []


def test_model_dir_without_manifest_is_never_trusted(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    (src / "config.json").write_text("{}")
    real = Store.publish_bytes
    calls = {"n": 0}

    def flaky(self: Store, uri: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise StorageError("interrupted")
        real(self, uri, data)

    monkeypatch.setattr(Store, "publish_bytes", flaky)
    with pytest.raises(StorageError):
        store.put_dir(src, "train", "k", base_model="tiny-random", kind="lora")
    monkeypatch.undo()
    assert not store.exists(store.uri("train", "k", "model", MANIFEST))
    guess = ModelRef(
        uri=store.uri("train", "k", "model"), sha256="0" * 64, base_model="tiny-random", kind="lora"
    )
    with pytest.raises(StorageError):
        store.get_dir(guess, tmp_path / "cache")

    ref = store.put_dir(src, "train", "k", base_model="tiny-random", kind="lora")
    local = store.get_dir(ref, tmp_path / "cache")
    assert (local / "adapter_model.safetensors").read_bytes() == b"w" * 1000
    assert store.get_dir(ref, tmp_path / "cache") == local  # second call: the verified copy
    store.verify(ref)
    # A published file damaged afterwards is refused.
    store.publish_bytes(f"{ref.uri}/config.json", b'{"damaged": true}')
    with pytest.raises(StorageError, match="manifest"):
        store.verify(ref)
    if store.is_local:
        with pytest.raises(StorageError, match="manifest"):
            store.get_dir(ref)


def test_stage_key_depends_on_content_config_and_version_not_paths() -> None:
    base = stage_key("filter", "1", {"traces": "a" * 64}, {"max": 1})
    assert base == stage_key("filter", "1", {"traces": "a" * 64}, {"max": 1})
    assert base != stage_key("filter", "2", {"traces": "a" * 64}, {"max": 1})
    assert base != stage_key("filter", "1", {"traces": "b" * 64}, {"max": 1})
    assert base != stage_key("filter", "1", {"traces": "a" * 64}, {"max": 2})
    assert base != stage_key("rewrite", "1", {"traces": "a" * 64}, {"max": 1})


KILL_SCRIPT = textwrap.dedent(
    """
    import io, os, sys
    sys.path.insert(0, {repo!r})
    import pyarrow as pa, pyarrow.parquet as pq
    from glyph_core.storage import Store
    store = Store({root!r})
    if store.is_local:
        real_fsync = os.fsync
        def die(fd):  # the bytes are in the temp file; the process is killed before publishing
            os._exit(137)
        os.fsync = die
    else:
        real = store.fs._call_s3
        async def die(method, *args, **kwargs):  # killed in the middle of the upload
            if method in ("put_object", "upload_part", "complete_multipart_upload"):
                os._exit(137)
            return await real(method, *args, **kwargs)
        store.fs._call_s3 = die
    table = pa.table({{"x": list(range(200000))}})
    store.write_table(table, "generate", "k", "data.parquet")
    """
)


def test_process_killed_while_writing_leaves_nothing(store: Store) -> None:
    script = KILL_SCRIPT.format(repo=str(REPO), root=store.root)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ), capture_output=True, timeout=120
    )
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    uri = store.uri("generate", "k", "data.parquet")
    fresh = Store(store.root, skip_instance_cache=True) if not store.is_local else store
    assert not fresh.exists(uri)
    with pytest.raises(StorageError):
        fresh.read_bytes(uri)
    # A later write under the same key succeeds and is complete.
    ref = fresh.write_table(_table(), "generate", "k", "data.parquet")
    assert pq.read_table(io.BytesIO(fresh.read_bytes(ref.uri))).num_rows == 5


def test_ensure_creates_a_missing_bucket(seaweed_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in seaweed_server.client_env().items():
        monkeypatch.setenv(k, v)
    bucket = f"fresh-{uuid.uuid4().hex[:10]}"
    st = Store(f"s3://{bucket}/glyph", skip_instance_cache=True).ensure()
    ref = st.write_table(_table(), "unify", "k")
    assert st.read_table(ref).num_rows == 5
    st.ensure()  # idempotent
