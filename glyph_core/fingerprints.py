"""Fingerprints of the dataset sources: what the unify stage is keyed on, and what the dataset
watcher compares between its runs (docs/design.md, "The cache key" and "The dataset watcher").

Both read the same per-file hashes (`source_files`), so the watcher can never consider the data
unchanged while unify sees new bytes, or the other way round. The whole source folder is hashed,
not only the files today's loader opens: a loader that starts reading another file can then
never serve a stale cache (a spurious rerun costs seconds, a stale one a wrong result).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
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


RevisionResolver = Callable[[str, str | None], str]
"""`resolve(hub_id, revision)`: the commit sha a Hub dataset's revision (None: the default
branch) names now. `hub_commit` asks the Hub; tests pass a stand-in, since the Hub cannot be
reached from CI."""


def hub_commit(hub_id: str, revision: str | None) -> str:
    """The commit sha `revision` of the Hub dataset `hub_id` names now (one API call)."""
    from huggingface_hub import HfApi  # only a Hub-backed unify or watcher needs it

    try:
        return str(HfApi().dataset_info(hub_id, revision=revision).sha)
    except Exception as exc:  # offline, unknown repository, auth: name the dataset
        raise SourceError(
            f"cannot resolve the revision on the Hub ({type(exc).__name__}: {exc}); "
            "check the network and HF_TOKEN, or set unify.data_dir to local files",
            path=f"hf://{hub_id}@{revision or 'main'}",
        ) from exc


def hub_repositories(source: str) -> list[str]:
    """The `HUB_SOURCES` entries a source reads: MATH also reads MATH-500 (for its ids)."""
    return [source, "math500"] if source == "math" else [source]


def hub_revisions(
    sources: list[str],
    revisions: Mapping[str, str | None] | None = None,
    resolve: RevisionResolver = hub_commit,
) -> dict[str, str]:
    """`{HUB_SOURCES name: commit sha}` for every repository `sources` read, each at its pinned
    (or given) revision resolved to the commit it names now."""
    revisions = revisions or {}
    names = dict.fromkeys(name for source in sources for name in hub_repositories(source))
    return {
        name: resolve(HUB_SOURCES[name].hub_id, revisions.get(name, HUB_SOURCES[name].revision))
        for name in names
    }


def fingerprint_hub(
    source: str, revisions: dict[str, str | None] | None = None, resolve: RevisionResolver = hub_commit
) -> str:
    """The Hub commit sha of each repository the source is read from (needs network)."""
    resolved = hub_revisions([source], revisions, resolve)
    return "hub:" + ",".join(f"{HUB_SOURCES[name].hub_id}@{sha}" for name, sha in resolved.items())


def source_fingerprints(
    sources: list[str],
    data_dir: str | None,
    revisions: dict[str, str | None] | None = None,
    resolve: RevisionResolver = hub_commit,
) -> dict[str, str]:
    """One fingerprint per source: local files where `data_dir` is given, else the Hub's."""
    if data_dir:
        return {s: fingerprint_local(data_dir, s) for s in sources}
    return {s: fingerprint_hub(s, revisions, resolve) for s in sources}


class SourcesRef(BaseModel):
    """The content of unify's inputs: a hash over the bytes of every source file (or, for the
    Hub, over the dataset ids and the commits their revisions name). It plays the part a
    `DatasetRef` plays for the other stages, so unify's cache key never depends on where the
    files are, and changes whenever their content does."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    data_dir: str | None
    files: dict[str, str] = Field(default_factory=dict, description="relative path (or Hub id) -> sha256")
    revisions: dict[str, str] = Field(
        default_factory=dict, description="Hub: HUB_SOURCES name -> the commit read (empty for local files)"
    )


def fingerprint_sources(cfg: UnifyConfig, resolve: RevisionResolver = hub_commit) -> SourcesRef:
    """Hash every file under `{data_dir}/{source}/` for the configured sources; for the Hub,
    the commit each dataset's revision names now (`resolve`, one API call per repository): a
    revision such as the default branch moves when the dataset changes, and the key with it.
    unify then reads exactly those commits (`SourcesRef.revisions`)."""
    if cfg.data_dir is None:
        resolved = hub_revisions(list(cfg.sources), resolve=resolve)
        commits = {name: f"{HUB_SOURCES[name].hub_id}@{sha}" for name, sha in resolved.items()}
        digest = hashlib.sha256("\n".join(sorted(commits.values())).encode()).hexdigest()
        return SourcesRef(sha256=digest, data_dir=None, files=commits, revisions=resolved)
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise GlyphError(f"data directory not found: {root}")
    files: dict[str, str] = {}
    for name in cfg.sources:
        files.update(source_files(root, name))
    sha = hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(files.items())).encode()).hexdigest()
    return SourcesRef(sha256=sha, data_dir=str(root.resolve()), files=files)
