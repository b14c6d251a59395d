"""Fingerprints of the dataset sources: what the unify stage is keyed on, and what the dataset
watcher compares between its runs (docs/design.md, "The cache key" and "The dataset watcher").

Both read the same per-file hashes (`source_files`), so the watcher can never consider the data
unchanged while unify sees new bytes, or the other way round. The whole source folder is hashed,
not only the files today's loader opens: a loader that starts reading another file can then
never serve a stale cache (a spurious rerun costs seconds, a stale one a wrong result).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from glyph_core.config import UnifyConfig
from glyph_core.errors import GlyphError, SourceError
from glyph_core.sources import HUB_SOURCES

_FILE_SHA: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised on (path, mtime, size): the cache policy and the stage both
    fingerprint the sources in one run, and hashing 27 MB twice is waste."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if memo not in _FILE_SHA:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _FILE_SHA[memo] = h.hexdigest()
    return _FILE_SHA[memo]


def source_files(data_dir: str | Path, source: str) -> dict[str, str]:
    """`{path relative to data_dir: sha256}` for every file under `{data_dir}/{source}/`, sorted."""
    folder = Path(data_dir).expanduser() / source
    if not folder.is_dir():
        raise SourceError(f"source folder missing for {source!r}", path=str(folder))
    root = folder.parent
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(q for q in folder.rglob("*") if q.is_file())
    }


def fingerprint_local(data_dir: str | Path, source: str) -> str:
    """One source's local files: sha256 over (path inside the source folder, sha256 of bytes)."""
    outer = hashlib.sha256()
    for rel, sha in source_files(data_dir, source).items():
        outer.update(f"{rel.split('/', 1)[1]}\0{sha}\n".encode())
    return "sha256:" + outer.hexdigest()


def fingerprint_hub(source: str, revisions: dict[str, str | None] | None = None) -> str:
    """The Hub commit sha of each repository the source is read from (needs network)."""
    from huggingface_hub import HfApi  # only the watcher on a Hub-backed deployment needs it

    revisions = revisions or {}
    names = [source, "math500"] if source == "math" else [source]
    api = HfApi()
    parts = []
    for name in names:
        spec = HUB_SOURCES[name]
        revision = revisions.get(name, spec.revision)
        parts.append(f"{spec.hub_id}@{api.dataset_info(spec.hub_id, revision=revision).sha}")
    return "hub:" + ",".join(parts)


def source_fingerprints(
    sources: list[str], data_dir: str | None, revisions: dict[str, str | None] | None = None
) -> dict[str, str]:
    """One fingerprint per source: local files where `data_dir` is given, else the Hub's."""
    if data_dir:
        return {s: fingerprint_local(data_dir, s) for s in sources}
    return {s: fingerprint_hub(s, revisions) for s in sources}


class SourcesRef(BaseModel):
    """The content of unify's inputs: a hash over the bytes of every source file (or, for the
    Hub, over the dataset ids and pinned revisions). It plays the part a `DatasetRef` plays for
    the other stages, so unify's cache key never depends on where the files are."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    data_dir: str | None
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")


def fingerprint_sources(cfg: UnifyConfig) -> SourcesRef:
    """Hash every file under `{data_dir}/{source}/` for the configured sources (the Hub: the
    dataset ids and pinned revisions, which name immutable content without a network call)."""
    if cfg.data_dir is None:
        desc = {
            name: [
                getattr(HUB_SOURCES.get(name), "hub_id", None),
                getattr(HUB_SOURCES.get(name), "revision", None),
            ]
            for name in [*cfg.sources, "math500"]
        }
        sha = hashlib.sha256(repr(sorted(desc.items())).encode()).hexdigest()
        return SourcesRef(sha256=sha, data_dir=None, files={k: str(v) for k, v in desc.items()})
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise GlyphError(f"data directory not found: {root}")
    files: dict[str, str] = {}
    for name in cfg.sources:
        files.update(source_files(root, name))
    sha = hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(files.items())).encode()).hexdigest()
    return SourcesRef(sha256=sha, data_dir=str(root.resolve()), files=files)
