"""Content-addressed artifacts on any fsspec filesystem (DESIGN §2, §4, §7).

Stages pass only small references between each other. A `DatasetRef` names a Parquet file by
URI *and* by the sha256 of its bytes, so caches key on content, never on paths: the same bytes
at another path hit the same cache entry.

Writes are atomic. A Parquet file is serialised in memory (hashing it on the way) and then
published in one step: `os.replace` of a temporary sibling on a local disk, one PUT on object
storage. s3fs and `ParquetWriter` both commit partial objects when an exception escapes a
`with` block, which is why nothing here streams straight to the final name. A model directory
is published by writing its `manifest.json` last; a directory without a manifest, or whose
files do not match it, is never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from glyph_core.errors import StorageError

MANIFEST = "manifest.json"


class DatasetRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str
    rows: int
    schema_version: int = 1


class ModelRef(BaseModel):
    """A published model directory; `sha256` is the hash of its manifest."""

    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str
    base_model: str
    kind: str  # "lora" | "full" | "base"


def canonical_json(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(stage: str, version: str, inputs: dict[str, str], config: Any) -> str:
    """The one cache key of a stage: name, explicit version, input hashes and config.

    The Prefect cache policy and the storage location both use this, so a cached result always
    points at the artifact written under the same key.
    """
    payload = canonical_json({"stage": stage, "version": version, "inputs": inputs, "config": config})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _storage_options(root: str) -> dict[str, Any]:
    """Endpoint and credentials come from the usual AWS variables; they are never logged."""
    if root.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


class Store:
    """A root directory (local path or fsspec URL) holding `{stage}/{key}/...` artifacts."""

    def __init__(self, root: str | os.PathLike[str], **storage_options: Any) -> None:
        root = str(root)
        if "://" not in root:
            root = str(Path(root).expanduser().resolve())
        self.root = root.rstrip("/")
        options = {**_storage_options(self.root), **storage_options}
        self.fs, _ = fsspec.core.url_to_fs(self.root, **options)
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # -- locations ------------------------------------------------------------------------
    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, uri: str) -> bool:
        return bool(self.fs.exists(uri))

    def ensure(self) -> Store:
        """Create the root (the bucket, on object storage) so a fresh store works at once."""
        try:
            if self.is_local:
                Path(self.fs._strip_protocol(self.root)).mkdir(parents=True, exist_ok=True)
            else:
                bucket = self.fs._strip_protocol(self.root).split("/", 1)[0]
                if not self.fs.exists(bucket):
                    with contextlib.suppress(FileExistsError):  # created meanwhile by another run
                        self.fs.mkdir(bucket)
        except OSError as exc:
            raise StorageError(f"cannot create the store root {self.root}: {exc}") from exc
        return self

    def link(self, uri: str) -> str:
        """A URL a person can open: `file://` for local paths, the URI itself otherwise."""
        return Path(uri).as_uri() if self.is_local and "://" not in uri else uri

    # -- bytes ------------------------------------------------------------------------------
    def publish_bytes(self, uri: str, data: bytes) -> None:
        """Make `data` visible at `uri` in one step, or not at all."""
        try:
            if self.is_local:
                path = Path(self.fs._strip_protocol(uri))
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
                try:
                    with open(tmp, "wb") as fh:
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                self.fs.pipe_file(uri, data)
        except OSError as exc:
            raise StorageError(f"could not write {uri}: {exc}") from exc

    def read_bytes(self, uri: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(uri))
        except FileNotFoundError:
            raise StorageError(f"artifact not found: {uri}") from None

    # -- tables -----------------------------------------------------------------------------
    def write_table(
        self, table: pa.Table, stage: str, key: str, name: str = "data.parquet", schema_version: int = 1
    ) -> DatasetRef:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        uri = self.uri(stage, key, name)
        self.publish_bytes(uri, data)
        return DatasetRef(
            uri=uri,
            sha256=hashlib.sha256(data).hexdigest(),
            rows=table.num_rows,
            schema_version=schema_version,
        )

    def read_table(self, ref: DatasetRef, verify: bool = True) -> pa.Table:
        data = self.read_bytes(ref.uri)
        if verify and hashlib.sha256(data).hexdigest() != ref.sha256:
            raise StorageError(f"{ref.uri}: content does not match its sha256 {ref.sha256[:12]}…")
        return pq.read_table(io.BytesIO(data))

    def verify(self, ref: DatasetRef | ModelRef) -> None:
        """Raise `StorageError` unless the artifact behind `ref` is present and intact.

        A cache entry can outlive its artifact (deleted, overwritten, half-restored from a
        backup); a ref is only handed on after this check.
        """
        if isinstance(ref, ModelRef):
            self.verify_model(ref)
            return
        if hashlib.sha256(self.read_bytes(ref.uri)).hexdigest() != ref.sha256:
            raise StorageError(f"{ref.uri}: content does not match its sha256 {ref.sha256[:12]}…")

    def check_model(self, ref: ModelRef) -> dict[str, Any]:
        """The model's manifest, after checking its hash and that every listed file exists.

        Cheap (no download of the weights), for deciding whether a cached ref is still usable;
        `get_dir` checks every file's hash when the model is actually loaded.
        """
        body = self.read_bytes(f"{ref.uri}/{MANIFEST}")
        if hashlib.sha256(body).hexdigest() != ref.sha256:
            raise StorageError(f"{ref.uri}: manifest does not match its sha256")
        manifest = json.loads(body)
        for rel in manifest["files"]:
            if not self.exists(f"{ref.uri}/{rel}"):
                raise StorageError(f"{ref.uri}/{rel}: listed in the manifest but missing")
        return dict(manifest)

    def verify_model(self, ref: ModelRef) -> dict[str, Any]:
        """The model's manifest, after checking it and every file it lists against their hashes."""
        body = self.read_bytes(f"{ref.uri}/{MANIFEST}")
        if hashlib.sha256(body).hexdigest() != ref.sha256:
            raise StorageError(f"{ref.uri}: manifest does not match its sha256")
        manifest = json.loads(body)
        for rel, digest in manifest["files"].items():
            if hashlib.sha256(self.read_bytes(f"{ref.uri}/{rel}")).hexdigest() != digest:
                raise StorageError(f"{ref.uri}/{rel}: content does not match the manifest")
        return dict(manifest)

    # -- json -------------------------------------------------------------------------------
    def write_json(self, obj: Any, stage: str, key: str, name: str) -> str:
        uri = self.uri(stage, key, name)
        self.publish_bytes(uri, json.dumps(obj, indent=2, default=str).encode())
        return uri

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    # -- model directories ------------------------------------------------------------------
    def put_dir(self, local_dir: str | Path, stage: str, key: str, base_model: str, kind: str) -> ModelRef:
        """Upload every file, then the manifest listing their hashes: the manifest publishes."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
        if not files:
            raise StorageError(f"{local_dir}: no files to publish")
        extra = {}
        if (local_dir / MANIFEST).exists():
            extra = json.loads((local_dir / MANIFEST).read_text())
        entries = {}
        for path in files:
            rel = path.relative_to(local_dir).as_posix()
            data = path.read_bytes()
            entries[rel] = hashlib.sha256(data).hexdigest()
            self.publish_bytes(self.uri(stage, key, "model", rel), data)
        manifest = {**extra, "base_model": base_model, "kind": kind, "files": entries}
        body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        uri = self.uri(stage, key, "model")
        self.publish_bytes(f"{uri}/{MANIFEST}", body)
        return ModelRef(uri=uri, sha256=hashlib.sha256(body).hexdigest(), base_model=base_model, kind=kind)

    def get_dir(self, ref: ModelRef, cache_dir: str | Path | None = None) -> Path:
        """A local directory with the model's files, checked against the manifest.

        On a local store that is the published directory itself (every file verified, so a
        directory damaged after publishing is refused); on object storage a verified copy in
        `cache_dir`, published there by renaming a complete temporary directory.
        """
        if self.is_local:
            self.verify_model(ref)
            return Path(self.fs._strip_protocol(ref.uri))
        body = self.read_bytes(f"{ref.uri}/{MANIFEST}")
        if hashlib.sha256(body).hexdigest() != ref.sha256:
            raise StorageError(f"{ref.uri}: manifest does not match its sha256")
        manifest = json.loads(body)
        base = Path(cache_dir or Path(tempfile.gettempdir()) / "glyph-models") / ref.sha256[:24]
        if (base / MANIFEST).exists() and (base / MANIFEST).read_bytes() == body:
            return base
        tmp = base.with_name(base.name + f".tmp-{uuid.uuid4().hex}")
        try:
            for rel, digest in manifest["files"].items():
                data = self.read_bytes(f"{ref.uri}/{rel}")
                if hashlib.sha256(data).hexdigest() != digest:
                    raise StorageError(f"{ref.uri}/{rel}: content does not match the manifest")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            (tmp / MANIFEST).write_bytes(body)
            if base.exists():  # an incomplete copy (no manifest) or one from a concurrent reader
                if (base / MANIFEST).exists() and (base / MANIFEST).read_bytes() == body:
                    return base
                shutil.rmtree(base, ignore_errors=True)
            try:
                os.replace(tmp, base)
            except OSError:
                if not ((base / MANIFEST).exists() and (base / MANIFEST).read_bytes() == body):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return base
