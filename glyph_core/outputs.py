"""What a stage hands to the next one: `StageOutput` (named refs plus stats), and the few
functions that make, check and import refs.

Every stage runner returns a `StageOutput`; the pipeline passes its refs on by name (the names a
stage declares as `outputs` in `glyph_core.stages`), Prefect persists it as the task's JSON
result, and a GPU child run writes it to the store for its parent. Only small, content-addressed
refs travel: the data stays in the store (docs/design.md, "Stages and their contracts").
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from glyph_core.errors import GlyphError
from glyph_core.fingerprints import file_sha256
from glyph_core.storage import DatasetRef, ModelRef, Store, canonical_json

Ref = DatasetRef | ModelRef

Progress = Callable[[int, int], None]
"""`progress(done, total)`: long stages call it (generate per shard, train per optimizer step);
the Prefect task turns it into a progress artifact, the CLI into a progress bar."""


class StageStats(BaseModel):
    rows_in: int = 0
    rows_out: int = 0
    errors: int = 0
    """Work items that failed within the stage's error budget (error completions of generate
    and evaluate); shown in the run's summary table and the stage's artifact."""
    drops: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = Field(default_factory=dict)


class StageOutput(BaseModel):
    """What a stage hands to the next one (and what Prefect persists as its JSON result)."""

    stage: str
    key: str
    refs: dict[str, DatasetRef | ModelRef]
    stats: StageStats

    @property
    def ref(self) -> DatasetRef | ModelRef:
        """The main output (the first ref)."""
        return next(iter(self.refs.values()))


class Timer:
    """Seconds since creation, for `StageStats.seconds`."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def count_values(table: pa.Table, column: str) -> dict[str, int]:
    """How many rows have each value of `column` (empty when the column is absent), sorted."""
    if column not in table.column_names:
        return {}
    out: dict[str, int] = {}
    for value in table.column(column).to_pylist():
        out[str(value)] = out.get(str(value), 0) + 1
    return dict(sorted(out.items()))


def dataset_ref(uri: str, data: bytes) -> DatasetRef:
    """A ref to Parquet bytes at `uri`: their sha256 and row count (read from the footer)."""
    try:
        rows = int(pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows)
    except (pa.ArrowInvalid, OSError) as exc:
        raise GlyphError(f"{uri}: not a readable Parquet file ({exc})") from None
    return DatasetRef(uri=uri, sha256=hashlib.sha256(data).hexdigest(), rows=rows)


def ref_of(store: Store, uri: str) -> DatasetRef:
    """A ref to a Parquet file a stage module published by itself (hash and row count read back)."""
    return dataset_ref(uri, store.read_bytes(uri))


def verify_output(store: Store, out: StageOutput) -> bool:
    """Is every artifact a (cached) output names still there and intact?

    A cache record outlives its artifact if someone deletes or damages the artifact; a later
    run must not hand the next stage a ref to nothing. Tables are checked by hash (the next
    stage reads them anyway); models by their manifest, the presence and size of every file and
    the hash of every file up to `$GLYPH_VERIFY_MAX_BYTES` (`Store.check_model`): an adapter is
    hashed in full, the multi-GB shards of a full-weight model only when it is loaded.
    """
    try:
        for ref in out.refs.values():
            if isinstance(ref, ModelRef):
                store.check_model(ref)
            else:
                store.verify(ref)
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# files from outside the store (the `glyph <stage>` commands take plain files and directories)

IMPORTS = "_inputs"


def import_table(store: Store, path: Path) -> DatasetRef:
    """Publish a local Parquet file into the store under its content hash and return its ref.

    Stage runners read refs through the store, on S3 as on a local disk, so a file given on the
    command line is copied in once (`_inputs/{sha256}/{name}`); the same bytes again cost a hash.
    """
    if not path.is_file():
        raise GlyphError(f"input file not found: {path}")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    ref = dataset_ref(store.uri(IMPORTS, sha[:24], path.name), data)
    if not store.exists(ref.uri):
        store.publish_bytes(ref.uri, data)
    return ref


def import_model(store: Store, name_or_dir: str) -> ModelRef:
    """A `ModelRef` for a model given on the command line.

    A directory (a `glyph train` output, an adapter, a full model) is published into the store
    like the train stage publishes its own, its base model read from its `manifest.json` or
    `adapter_config.json`; anything else is a base model name (Hub id or alias such as
    `smollm2-135m`), which the evaluate stage scores alone (kind `base`).
    """
    path = Path(name_or_dir).expanduser()
    if not path.is_dir():
        if name_or_dir.startswith((".", "/", "~")):
            raise GlyphError(f"model directory {name_or_dir} does not exist")
        digest = hashlib.sha256(canonical_json(["base", name_or_dir]).encode()).hexdigest()
        return ModelRef(uri=name_or_dir, sha256=digest, base_model=name_or_dir, kind="base")
    meta: dict[str, Any] = {}
    for name in ("manifest.json", "adapter_config.json"):
        if (path / name).is_file():
            meta = {**_read_json(path / name), **meta}
    base = meta.get("base_model") or meta.get("base_model_name_or_path")
    if not base:
        raise GlyphError(
            f"{path}: neither manifest.json nor adapter_config.json names the base model it was tuned from"
        )
    kind = meta.get("kind") or ("lora" if (path / "adapter_config.json").is_file() else "full")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256(
        canonical_json({p.relative_to(path).as_posix(): file_sha256(p) for p in files}).encode()
    ).hexdigest()
    return store.put_dir(path, IMPORTS, digest[:24], str(base), str(kind))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise GlyphError(f"{path}: unreadable ({exc})") from None
