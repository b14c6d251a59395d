"""The train stage: key, work directory, publish (docs/design.md, "Train").

Three layers, each importing only the one below: this stage calls the launcher
(`glyph_core.launch`: in this process, or `accelerate launch` for several GPUs), which calls
the trainer (`glyph_core.trainer.train_sft`: TRL + PEFT). The trainer knows nothing of keys or
stores; this module knows nothing of how training is started.

- **Work directory per store and key** (`work_dir_for`): checkpoints live under the store for a
  local store, else under a per-user, per-store directory of the local temp dir, and a lock
  keeps a second process off a key that is being trained. So a crashed run retried on the same
  store resumes from its checkpoints, and a run on another store (or of another user) never
  resumes from, or trips over, someone else's.
- **Published first**: the model is published under `train/{key}/model` (manifest written last)
  with `train/{key}/metrics.parquet` and `run.json` beside it, all before the stage returns, so
  nothing that talks to the Prefect API afterwards (artifacts, the task's state) can lose it.
- **Reused when published**: before training, the stage looks for an intact model under its key
  (every file checked against the manifest). A retry whose first attempt published but could
  not report it (the Prefect server died) takes it instead of training again, as generate
  takes its published shards; a damaged one is trained again.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glyph_core.config import TrainConfig
from glyph_core.errors import StorageError
from glyph_core.launch import run_training
from glyph_core.outputs import Progress, StageOutput, StageStats, Timer, ref_of
from glyph_core.storage import MANIFEST, DatasetRef, ModelRef, Store, stage_key
from glyph_core.trainer import RUN_NAME, VERSION

log = logging.getLogger(__name__)

WORK_DIR = "_work"


def key(cfg: TrainConfig, *, sft: DatasetRef) -> str:
    return stage_key("train", VERSION, {"sft": sft.sha256}, cfg.key_dump())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return str(os.getuid())


def work_dir_for(store: Store, out_key: str) -> Path:
    """Where checkpoints live while the stage runs: one directory per store and key.

    A local store keeps it beside what it produces (`{store}/_work/train/{key}`), so moving or
    deleting the store takes it along. Checkpoints need a local disk, so an object store's go to
    `{tmp}/glyph-work-{user}/{sha256 of the store URI}/train/{key}`: per user (another user's
    files are neither read nor in the way) and per store (the same inputs on two buckets are two
    trainings).
    """
    if store.is_local:
        return Path(store.fs._strip_protocol(store.root)) / WORK_DIR / "train" / out_key
    digest = hashlib.sha256(store.root.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"glyph-work-{_user()}" / digest / "train" / out_key


@contextlib.contextmanager
def locked(work: Path) -> Iterator[None]:
    """Hold the key's work directory alone: an exclusive `flock` on `{work}.lock`, which the
    kernel releases when the holder exits or dies, so a crashed run never leaves it held. A
    second process on the same key waits for the first (it is training), then finds the model
    published and reuses it."""
    lock_path = work.with_name(f"{work.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            log.info("train %s: %s trains this key; waiting for it", work.name, holder)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def published(store: Store, out_key: str) -> tuple[ModelRef, DatasetRef, dict[str, Any]] | None:
    """The model, metrics and run record an earlier run published under `out_key`, if every
    model file matches its manifest; None when there is none or it is damaged."""
    manifest_uri = store.uri("train", out_key, "model", MANIFEST)
    metrics_uri = store.uri("train", out_key, "metrics.parquet")
    if not store.exists(manifest_uri):
        return None
    try:
        body = store.read_bytes(manifest_uri)
        manifest = json.loads(body)
        model = ModelRef(
            uri=store.uri("train", out_key, "model"),
            sha256=hashlib.sha256(body).hexdigest(),
            base_model=manifest["base_model"],
            kind=manifest["kind"],
        )
        store.verify_model(model)
        metrics = ref_of(store, metrics_uri)
        run_uri = store.uri("train", out_key, RUN_NAME)
        run = store.read_json(run_uri) if store.exists(run_uri) else {}
    except (StorageError, ValueError, KeyError) as exc:
        log.warning("train %s: the published model is unusable (%s); training again", out_key, exc)
        return None
    return model, metrics, run


def run(
    store: Store,
    cfg: TrainConfig,
    *,
    sft: DatasetRef,
    progress: Progress | None = None,
    work_dir: str | Path | None = None,
) -> StageOutput:
    """Fine-tune the student (or reuse the model published under this key); the model directory
    is published with its manifest last."""
    timer = Timer()
    out_key = key(cfg, sft=sft)
    work = Path(work_dir) if work_dir else work_dir_for(store, out_key)
    with locked(work):
        found = published(store, out_key)
        if found is not None:
            model, metrics, run_info = found
            log.info("train %s: reusing the model published under this key", out_key)
        else:
            work.mkdir(parents=True, exist_ok=True)
            result = run_training(sft, cfg, work, store=store, keep_model=False, progress=progress)
            run_info = result.run
            metrics = store.write_table(result.metrics, "train", out_key, "metrics.parquet")
            store.write_json(run_info, "train", out_key, RUN_NAME)
            model = store.put_dir(result.model_dir, "train", out_key, cfg.base_model, result.kind)
            shutil.rmtree(work, ignore_errors=True)
    return StageOutput(
        stage="train",
        key=out_key,
        refs={"model": model, "metrics": metrics},
        stats=StageStats(
            rows_in=sft.rows,
            rows_out=1,
            seconds=timer.seconds,
            extra={
                "kind": model.kind,
                "base_model": model.base_model,
                "reused": found is not None,
                **{
                    k: run_info[k] for k in ("resumed_from", "train_seconds", "tokens_per_s") if k in run_info
                },
            },
        ),
    )
