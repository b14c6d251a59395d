"""Caching, result storage, locking and retries for the stage tasks (docs/design.md, "The cache key").

- `StageCachePolicy` keys a stage on its declared key function (`glyph_core.stages.Stage.key`):
  stage name, explicit version, sha256 of every input ref (never its path) and the config's
  `key_dump()`. It is the same function that chooses the artifact's location, so a cache hit always names the artifact
  written under the same key. It is combined with `TASK_SOURCE` (an edited task body reruns)
  and never with `RUN_ID` (results are reused across runs).
- Results are persisted as JSON (`result_serializer="json"`) under `{store}/_prefect/results`:
  a cached task returns the small `StageOutput` again, never data, and the cache lives with the
  artifacts it points to (same bucket on object storage, so another machine sees it).
- `SERIALIZABLE` isolation with a `FileSystemLockManager`: two runs that reach the same key at
  once compute it once; the second waits for the lock and then reads the committed result.
- Retries with exponential backoff only for failures a later try can fix (`is_transient`: a
  connection that failed, a time-out, throttling, a crashed GPU child run). A `GlyphError` is
  bad input or configuration, and a read-only store, a root that is a file or a damaged
  artifact stay so: retrying cannot fix them.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import RemoteFileSystem
from prefect.locking.filesystem import FileSystemLockManager
from prefect.tasks import exponential_backoff
from prefect.types._datetime import now

from glyph_core.errors import GlyphError, StorageError
from glyph_core.pids import pid_alive
from glyph_core.stages import get
from glyph_core.storage import TRANSIENT_ERRNOS, _storage_options
from tasks.children import StageRunCrashed

PREFECT_DIR = "_prefect"


@dataclass
class StageCachePolicy(CachePolicy):
    """Key = the stage's own key of the task's `cfg` and `refs`: content of the inputs, not their
    paths (the task's other parameters, such as the store and the GPU pool, do not enter it)."""

    stage: str = ""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        return f"{self.stage}-{get(self.stage).key_for(inputs['cfg'], inputs['refs'])}"


class LivenessFileLockManager(FileSystemLockManager):
    """Prefect's `FileSystemLockManager`, plus: a lock whose holder process is gone is broken.

    Prefect's file locks never expire (the transaction passes no hold timeout), so a run killed
    while computing a stage (OOM killer, SIGKILL, a crashed machine) would leave its lock
    behind, and every later run with the same key would wait on it forever. Each lock file here
    also records the holder's pid and host; a waiter on the same host that finds the pid dead
    removes the lock and proceeds. The lock file is published with a hard link from a complete
    temporary file, so a reader never sees a half-written lock (the base class can, and then
    fails to parse it).
    """

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        self._ensure_lock_files_directory_exists()
        lock_path = self._lock_path_for_key(key)
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            if self.is_lock_holder(key, holder):
                return True
            expiration = now("UTC") + timedelta(seconds=hold_timeout) if hold_timeout is not None else None
            body = json.dumps(
                {
                    "holder": holder,
                    "expiration": str(expiration) if expiration is not None else None,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                }
            ).encode()
            tmp = lock_path.with_name(f".{lock_path.name}.{uuid.uuid4().hex}")
            tmp.write_bytes(body)
            try:
                os.link(tmp, lock_path)  # atomic; fails if another holder has the lock
                self._locks[key] = {"holder": holder, "expiration": expiration, "path": lock_path}  # type: ignore[typeddict-item]
                return True
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.wait_for_lock(key, remaining) or (
                deadline is not None and time.monotonic() > deadline
            ):
                return False

    def _get_lock_info(self, key: str, use_cache: bool = True) -> Any:
        try:
            return super()._get_lock_info(key, use_cache=use_cache)
        except ValueError:  # unparsable: written by an older Prefect mid-write; locked, owner unknown
            return {"holder": "", "expiration": None, "path": self._lock_path_for_key(key)}

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if not super().is_locked(key, use_cache=use_cache):
            return False
        info = self._get_lock_info(key, use_cache=use_cache) or {}
        pid, host = info.get("pid"), info.get("host")
        if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
            Path(info["path"]).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return True


def stage_policy(stage: str, lock_dir: Path | None = None) -> CachePolicy:
    """The stage's cache policy, `+ TASK_SOURCE`, serialisable across concurrent runs."""
    policy = StageCachePolicy(stage=stage) + TASK_SOURCE
    if lock_dir is None:
        return policy
    return policy.configure(isolation_level="SERIALIZABLE", lock_manager=LivenessFileLockManager(lock_dir))


def result_storage_for(store_root: str) -> Path | str:
    """Where Prefect keeps the result records: beside the artifacts, under the store root.

    Prefect 3.9 accepts a task's result storage only as a `Path` (a local directory) or a
    block saved on the server, so an object store gets a `RemoteFileSystem` block named after
    the store (saved again each call: cheap, and it keeps the endpoint current). The block holds
    the endpoint only; credentials stay with botocore's own lookup (environment, config files),
    so they are never written to the server or a log.
    """
    root = store_root.rstrip("/")
    if "://" not in root or root.startswith("file://"):
        return Path(root.removeprefix("file://")).expanduser().resolve() / PREFECT_DIR / "results"
    name = "glyph-results-" + hashlib.sha256(root.encode()).hexdigest()[:16]
    block = RemoteFileSystem(basepath=f"{root}/{PREFECT_DIR}/results", settings=_storage_options(root))
    block.save(name, overwrite=True)
    return f"remote-file-system/{name}"


def lock_dir_for(store_root: str) -> Path:
    """File locks must be on a local disk: beside a local store, else per store under the temp dir
    (one host; several hosts on one object store need a shared lock manager, e.g. Redis)."""
    root = store_root.rstrip("/")
    if "://" not in root or root.startswith("file://"):
        return Path(root.removeprefix("file://")).expanduser().resolve() / PREFECT_DIR / "locks"
    digest = hashlib.sha256(root.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "glyph-locks" / digest


def _transient_types() -> tuple[type[BaseException], ...]:
    """Errors of the libraries a stage may go through that say "not now" rather than "never":
    a connection that failed, a request that timed out, a server that asked to slow down (each
    library only if installed). A 4xx answer, a missing file or a permission problem is not
    among them: retrying cannot fix it."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, StageRunCrashed]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ReadTimeoutError

        types += [BotoConnectionError, ReadTimeoutError]
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError]
    except ImportError:
        pass
    try:
        import httpx

        types.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import openai

        types += [openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError]
    except ImportError:
        pass
    return tuple(types)


TRANSIENT: tuple[type[BaseException], ...] = _transient_types()


def is_transient(exc: BaseException | None) -> bool:
    """Retry what a later try can fix: a storage error marked transient (connection, timeout,
    throttling; `StorageError.transient`), a network error, an OS error with a network or
    time-out errno. Never bad input or configuration (`GlyphError`), a read-only store, a root
    that is a file, denied access or a damaged artifact."""
    if exc is None:
        return False
    if isinstance(exc, StorageError):
        return exc.transient
    if isinstance(exc, GlyphError):
        return False
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: the failed state carries the exception."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:
            exc = raised
    return is_transient(exc)


def retry_options(retries: int, first_delay_s: float) -> dict[str, Any]:
    delays = exponential_backoff(backoff_factor=first_delay_s)(retries) if retries and first_delay_s else 0
    return {
        "retries": retries,
        "retry_delay_seconds": delays,
        "retry_jitter_factor": 0.5 if first_delay_s else None,
        "retry_condition_fn": retry_on_transient,
    }
