"""Content-addressed artifacts on any fsspec filesystem (docs/design.md, "Storage" and "The cache key").

Stages pass only small references between each other. A `DatasetRef` names a Parquet file by
URI *and* by the sha256 of its bytes, so caches key on content, never on paths: the same bytes
at another path hit the same cache entry.

Writes are atomic. A Parquet file is serialised in memory (hashing it on the way) and then
published in one step: `os.replace` of a temporary sibling on a local disk, one PUT on object
storage. s3fs and `ParquetWriter` both commit partial objects when an exception escapes a
`with` block, which is why nothing here streams straight to the final name. A model directory
is published by writing its `manifest.json` last; a directory without a manifest, or whose
files do not match it, is never trusted.

Nothing waits forever, and every failure is one `StorageError` line naming the path or the
endpoint and what to check. On object storage each request has a connect and a read timeout
and a bounded number of attempts (botocore's, the only retry loop: s3fs's own is set to one
pass), `$GLYPH_S3_CONNECT_TIMEOUT` / `$GLYPH_S3_READ_TIMEOUT` (seconds) and
`$GLYPH_S3_MAX_ATTEMPTS` override them. `ensure` probes the store once before any work: a
missing, dead or silent endpoint, a root that is a file or a read-only directory fail there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import botocore.exceptions as boto
import botocore.handlers
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from aiobotocore.session import AioSession
from pydantic import BaseModel, ConfigDict

from glyph_core.errors import SettingError, StorageError

MANIFEST = "manifest.json"
STORE_HINT = "choose another store (--store or $GLYPH_STORE)"


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


@dataclass(frozen=True)
class S3Limits:
    """How long one S3 request may take: with the defaults a dead endpoint fails in seconds and
    a silent one (accepts connections, never answers) in about 20 s, instead of never."""

    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    max_attempts: int = 2  # tries per request, the first included

    ENV = {
        "connect_timeout": "GLYPH_S3_CONNECT_TIMEOUT",
        "read_timeout": "GLYPH_S3_READ_TIMEOUT",
        "max_attempts": "GLYPH_S3_MAX_ATTEMPTS",
    }

    @classmethod
    def from_env(cls) -> S3Limits:
        values: dict[str, Any] = {}
        for name, var in cls.ENV.items():
            text = os.environ.get(var)
            if not text:
                continue
            kind = int if name == "max_attempts" else float
            try:
                values[name] = kind(text)
            except ValueError:
                values[name] = -1
            if values[name] <= 0:
                raise SettingError(f"${var}={text!r}: must be a {kind.__name__} > 0")
        return cls(**values)

    def config_kwargs(self) -> dict[str, Any]:
        """Arguments of `botocore.config.Config`, which s3fs passes on from `config_kwargs`."""
        return {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "retries": {"total_max_attempts": self.max_attempts, "mode": "standard"},
        }


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _bounded_session() -> AioSession:
    """A botocore session whose PUTs carry no `Expect: 100-continue`.

    aiohttp starts a request's read timeout only once the body is sent, and with that header it
    first waits for the interim "100 Continue": a server that accepts the connection and never
    answers then holds a write forever, whatever `read_timeout` says. S3 does not need the
    header (it only saves sending a body that would be refused), so it goes. One session per
    store, because a session caches the credentials it resolved.
    """
    session = AioSession()
    session.unregister("before-call.s3", botocore.handlers.add_expect_header)
    return session


def _storage_options(root: str) -> dict[str, Any]:
    """Endpoint and limits; credentials come from the usual AWS variables and are never logged.
    Plain JSON, because Prefect saves them in a result-storage block (tasks/caching.py)."""
    if root.startswith("s3://"):
        endpoint = s3_endpoint()
        options: dict[str, Any] = {"config_kwargs": S3Limits.from_env().config_kwargs()}
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options
    return {}


# The OS's, botocore's, aiohttp's (raised through aiobotocore) and the event loop's timeouts.
_STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    boto.BotoCoreError,
    boto.ClientError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    fsspec.exceptions.FSTimeoutError,
)
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
# Answers that mean "not now": the server is overloaded or restarting, so a later try can succeed.
_THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "500",
    "503",
}
# A local (or network-mounted) disk that did not answer, or a connection that broke.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ETIMEDOUT,
        errno.EAGAIN,
        errno.EINTR,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }  # fmt: skip
)


VERIFY_MAX_BYTES_ENV = "GLYPH_VERIFY_MAX_BYTES"
VERIFY_MAX_BYTES = 1 << 30


def verify_max_bytes() -> int:
    """Files up to this size are hashed at a model's cache check (`Store.check_model`)."""
    text = os.environ.get(VERIFY_MAX_BYTES_ENV)
    if not text:
        return VERIFY_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise SettingError(f"${VERIFY_MAX_BYTES_ENV}={text!r}: must be an int >= 0 (bytes)")
    return value


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class Store:
    """A root directory (local path or fsspec URL) holding `{stage}/{key}/...` artifacts."""

    def __init__(self, root: str | os.PathLike[str], **storage_options: Any) -> None:
        root = str(root)
        if "://" not in root:
            root = str(Path(root).expanduser().resolve())
        self.root = root.rstrip("/")
        options = {**_storage_options(self.root), **storage_options}
        if self.root.startswith("s3://"):
            options.setdefault("session", _bounded_session())
        self.fs, _ = fsspec.core.url_to_fs(self.root, **options)
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol
        if not self.is_local and hasattr(self.fs, "retries"):
            self.fs.retries = 1  # s3fs retries on top of botocore: one bounded loop is enough
        self.limits = S3Limits.from_env()

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # -- locations ------------------------------------------------------------------------
    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, uri: str) -> bool:
        with self._failures("check", uri):
            return bool(self.fs.exists(uri))

    def ensure(self) -> Store:
        """Create the root (the bucket, on object storage) so a fresh store works at once, and
        check that it can be written: a bad store fails here, before any stage starts."""
        if self.is_local:
            self._ensure_local(Path(self.fs._strip_protocol(self.root)))
            return self
        bucket = self.fs._strip_protocol(self.root).split("/", 1)[0]
        with self._failures("open the bucket of", self.root):
            try:
                self.fs.call_s3("head_bucket", Bucket=bucket)  # one request: reachable, allowed?
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):  # created meanwhile by another run
                    self.fs.mkdir(bucket)
        return self

    def _ensure_local(self, root: Path) -> None:
        if root.exists() and not root.is_dir():
            raise StorageError(f"store root {root} is a file, not a directory: {STORE_HINT} or move the file")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            blocker = _existing_ancestor(root)
            if not blocker.is_dir():
                raise StorageError(
                    f"cannot create the store root {root}: {blocker} is a file, not a directory: {STORE_HINT}"
                ) from None
            raise StorageError(
                f"cannot create the store root {root} ({exc.strerror}): "
                f"make {blocker} writable or {STORE_HINT}"
            ) from None
        probe = root / f".write-test-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
        except OSError as exc:
            raise StorageError(
                f"store root {root} is not writable ({exc.strerror}): make it writable "
                f"(chmod u+w {root}) or {STORE_HINT}"
            ) from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    @contextlib.contextmanager
    def _failures(self, action: str, uri: str) -> Iterator[None]:
        """Turn a storage library's exception into one `StorageError` line: what failed, where,
        and what to check. `FileNotFoundError` passes through for callers that expect it."""
        try:
            yield
        except (StorageError, FileNotFoundError):
            raise
        except _STORAGE_ERRORS as exc:
            raise self._explain(action, uri, exc) from exc

    def _explain(self, action: str, uri: str, exc: BaseException) -> StorageError:
        """`could not <action> <uri>: <why>; <what to check>`, never a credential. Marked
        transient only where trying again can succeed (timeouts, connections, throttling)."""
        if self.is_local:
            path = Path(self.fs._strip_protocol(uri))
            reason = getattr(exc, "strerror", None) or str(exc)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                fix = "free disk space or " + STORE_HINT
            elif isinstance(exc, OSError) and exc.errno in (errno.ENOTDIR, errno.EEXIST):
                fix = f"a file is in the way: remove it or {STORE_HINT}"
            else:
                fix = f"make {_existing_ancestor(path.parent)} writable or {STORE_HINT}"
            transient = isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS
            return StorageError(f"could not {action} {path} ({reason}): {fix}", transient=transient)
        endpoint = s3_endpoint()
        where = f"S3 endpoint {endpoint}" if endpoint else "AWS S3 (no AWS_ENDPOINT_URL set)"
        head = f"could not {action} {uri}: {where}"
        code = str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, boto.ClientError) else ""
        if isinstance(exc, boto.ReadTimeoutError | asyncio.TimeoutError | fsspec.exceptions.FSTimeoutError):
            return StorageError(
                f"{head} accepted the connection but did not answer within {self.limits.read_timeout:g} s "
                f"({self.limits.max_attempts} attempt(s)); check the server's health "
                "($GLYPH_S3_READ_TIMEOUT raises the limit)",
                transient=True,
            )
        if isinstance(
            exc, boto.EndpointConnectionError | boto.ConnectTimeoutError | aiohttp.ClientConnectionError
        ):
            fix = (
                "check that the server is running and AWS_ENDPOINT_URL points at it"
                if endpoint
                else "set AWS_ENDPOINT_URL to your S3 server (MinIO, SeaweedFS) or check the network"
            )
            return StorageError(f"{head} cannot be reached; {fix}", transient=True)
        if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
            return StorageError(
                f"{head} needs credentials and none were found; "
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        if isinstance(exc, PermissionError) or code in _DENIED:
            return StorageError(
                f"{head} denied access{f' ({code})' if code else ''}; "
                "check the credentials (AWS_ACCESS_KEY_ID) and the bucket's permissions"
            )
        if code in _THROTTLED:
            return StorageError(f"{head} is busy or restarting ({code}); try again later", transient=True)
        return StorageError(f"{head} failed: {type(exc).__name__}: {exc}"[:500])

    # -- bytes ------------------------------------------------------------------------------
    def publish_bytes(self, uri: str, data: bytes) -> None:
        """Make `data` visible at `uri` in one step, or not at all."""
        with self._failures("write", uri):
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

    def read_bytes(self, uri: str) -> bytes:
        try:
            with self._failures("read", uri):
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

    def _manifest(self, ref: ModelRef) -> tuple[bytes, dict[str, Any]]:
        body = self.read_bytes(f"{ref.uri}/{MANIFEST}")
        if hashlib.sha256(body).hexdigest() != ref.sha256:
            raise StorageError(f"{ref.uri}: manifest does not match its sha256")
        return body, dict(json.loads(body))

    def _sizes(self, uri: str) -> dict[str, int]:
        """`{path relative to uri: bytes}` of every file below `uri`: one listing (one request
        on object storage), not one `exists` per file."""
        base = self.fs._strip_protocol(uri).rstrip("/") + "/"
        with self._failures("list", uri):
            found = self.fs.find(uri, detail=True)
        return {p[len(base) :]: int(info.get("size") or 0) for p, info in found.items() if p.startswith(base)}

    def _sha256(self, uri: str) -> str:
        """sha256 of a stored file, read in blocks (a weights file need not fit in memory twice)."""
        h = hashlib.sha256()
        with self._failures("read", uri), self.fs.open(uri, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()

    def _damaged(self, ref: ModelRef, rel: str, why: str) -> StorageError:
        """A model file that does not match its manifest is moved aside (`<name>.damaged`):
        every later check then finds it missing, so the stage that wrote it is recomputed,
        instead of a damage that only loading can see failing every later run the same way."""
        uri = f"{ref.uri}/{rel}"
        with contextlib.suppress(Exception):  # the error below is what matters
            self.fs.mv(uri, f"{uri}.damaged")
        return StorageError(f"{uri}: {why}; moved aside as {rel}.damaged so that it is recomputed")

    def check_model(self, ref: ModelRef, hash_limit: int | None = None) -> dict[str, Any]:
        """The model's manifest, after checking it against its hash and every file it lists:
        present, of the recorded size, and hashed when at most `hash_limit` bytes
        (`$GLYPH_VERIFY_MAX_BYTES`, default 1 GiB).

        This is the cache check of a model (`outputs.verify_output`), so it must stay cheap for
        a cached rerun: an adapter (tens to hundreds of MB) and a small model are hashed in full,
        so a flipped byte is found here and the model recomputed; the multi-GB shards of a
        full-weight model are checked by size only, and hashed when the model is loaded
        (`get_dir`), where a damaged file is moved aside so that the next check sees it.
        """
        _, manifest = self._manifest(ref)
        limit = verify_max_bytes() if hash_limit is None else hash_limit
        present = self._sizes(ref.uri)
        sizes = manifest.get("sizes", {})
        for rel, digest in manifest["files"].items():
            if rel not in present:
                raise StorageError(f"{ref.uri}/{rel}: listed in the manifest but missing")
            if rel in sizes and present[rel] != sizes[rel]:
                raise self._damaged(ref, rel, f"{present[rel]} bytes where the manifest says {sizes[rel]}")
            if present[rel] <= limit and self._sha256(f"{ref.uri}/{rel}") != digest:
                raise self._damaged(ref, rel, "content does not match the manifest")
        return manifest

    def verify_model(self, ref: ModelRef) -> dict[str, Any]:
        """The model's manifest, after checking it and every file it lists against their hashes."""
        return self.check_model(ref, hash_limit=sys.maxsize)

    # -- json -------------------------------------------------------------------------------
    def write_json(self, obj: Any, stage: str, key: str, name: str) -> str:
        uri = self.uri(stage, key, name)
        self.publish_bytes(uri, json.dumps(obj, indent=2, default=str).encode())
        return uri

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    # -- model directories ------------------------------------------------------------------
    def put_dir(self, local_dir: str | Path, stage: str, key: str, base_model: str, kind: str) -> ModelRef:
        """Upload every file, then the manifest listing their hashes and sizes: the manifest
        publishes."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
        if not files:
            raise StorageError(f"{local_dir}: no files to publish")
        extra = {}
        if (local_dir / MANIFEST).exists():
            extra = json.loads((local_dir / MANIFEST).read_text())
        entries, sizes = {}, {}
        for path in files:
            rel = path.relative_to(local_dir).as_posix()
            data = path.read_bytes()
            entries[rel], sizes[rel] = hashlib.sha256(data).hexdigest(), len(data)
            self.publish_bytes(self.uri(stage, key, "model", rel), data)
        manifest = {**extra, "base_model": base_model, "kind": kind, "files": entries, "sizes": sizes}
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
        body, manifest = self._manifest(ref)
        base = Path(cache_dir or Path(tempfile.gettempdir()) / "glyph-models") / ref.sha256[:24]
        if (base / MANIFEST).exists() and (base / MANIFEST).read_bytes() == body:
            return base
        tmp = base.with_name(base.name + f".tmp-{uuid.uuid4().hex}")
        try:
            for rel, digest in manifest["files"].items():
                data = self.read_bytes(f"{ref.uri}/{rel}")
                if hashlib.sha256(data).hexdigest() != digest:
                    raise self._damaged(ref, rel, "content does not match the manifest")
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
