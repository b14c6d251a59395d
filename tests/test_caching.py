"""Unit tests of the orchestration pieces that need no Prefect server: the cache key, the retry
condition, the lock manager's handling of a dead holder, `refresh`, profiles and overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect.states import Failed

from glyph_core.config import FilterConfig
from glyph_core.errors import GlyphError, SourceError, StorageError
from glyph_core.profiles import apply_overrides, load_profile, parse_sets
from glyph_core.stages import get, names, refresh_set
from glyph_core.storage import DatasetRef
from tasks.caching import LivenessFileLockManager, StageCachePolicy, is_transient, retry_on_transient


def _ref(uri: str, sha: str = "a" * 64) -> DatasetRef:
    return DatasetRef(uri=uri, sha256=sha, rows=3)


def _inputs(store: str, traces: DatasetRef, problems: DatasetRef, cfg: FilterConfig) -> dict:
    """The filter task's parameters, as the cache policy receives them."""
    return {"store": store, "cfg": cfg, "refs": {"traces": traces, "problems": problems}, "gpu_pool": None}


def test_cache_key_is_content_not_path() -> None:
    policy = StageCachePolicy(stage="filter")
    cfg = FilterConfig()
    a = policy.compute_key(None, _inputs("/x", _ref("/a/t"), _ref("/a/p"), cfg), {})  # type: ignore[arg-type]
    b = policy.compute_key(None, _inputs("/y", _ref("/b/t"), _ref("/b/p"), cfg), {})  # type: ignore[arg-type]
    assert a == b
    c = policy.compute_key(None, _inputs("/x", _ref("/a/t", "b" * 64), _ref("/a/p"), cfg), {})  # type: ignore[arg-type]
    assert c != a
    speed_only = FilterConfig(workers=7)  # NOT_IN_KEY: does not change the output
    d = policy.compute_key(None, _inputs("/x", _ref("/a/t"), _ref("/a/p"), speed_only), {})  # type: ignore[arg-type]
    assert d == a
    changed = FilterConfig(max_completion_tokens=5)
    e = policy.compute_key(None, _inputs("/x", _ref("/a/t"), _ref("/a/p"), changed), {})  # type: ignore[arg-type]
    assert e != a
    # The Prefect key embeds the same stage key that names the artifact's folder.
    assert a == "filter-" + get("filter").key(cfg, traces=_ref("/a/t"), problems=_ref("/a/p"))


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (StorageError("read timed out", transient=True), True),
        (StorageError("store root is a file"), False),
        (ConnectionResetError("connection reset"), True),
        (PermissionError("read-only"), False),
        (ConnectionError("refused"), True),
        (TimeoutError(), True),
        (GlyphError("bad config"), False),
        (SourceError("bad row", path="x.jsonl", line=3), False),
        (ValueError("bug"), False),
        (KeyError("bug"), False),
    ],
)
def test_retry_only_transient_failures(exc: BaseException, expected: bool) -> None:
    assert is_transient(exc) is expected
    assert retry_on_transient(None, None, Failed(data=exc)) is expected


def test_refresh_set_includes_later_stages() -> None:
    assert refresh_set(None) == set()
    assert refresh_set(["filter"]) == {"filter", "rewrite", "train", "evaluate"}
    assert refresh_set(["train", "generate"]) == set(names()[1:])
    assert refresh_set(["all"]) == set(names())
    with pytest.raises(GlyphError, match="unknown stage"):
        refresh_set(["filtr"])


def test_overrides_are_validated() -> None:
    cfg = load_profile("tiny", parse_sets(["train.max_steps=3", "generate.teacher.temperature=0.2"]))
    assert cfg.train.max_steps == 3 and cfg.generate.teacher.temperature == 0.2
    assert apply_overrides(cfg, {"unify.sources": ["gsm8k"]}).unify.sources == ["gsm8k"]
    assert parse_sets(["unify.sources=gsm8k,math"]) == {"unify.sources": ["gsm8k", "math"]}
    with pytest.raises(GlyphError, match="unknown setting"):
        load_profile("tiny", {"train.max_stpes": 3})
    with pytest.raises(GlyphError, match=r"^train\.max_steps='many': must be a valid integer"):
        load_profile("tiny", {"train.max_steps": "many"})
    with pytest.raises(GlyphError, match="unknown profile"):
        load_profile("huge")
    for name in ("tiny", "demo", "full"):
        assert load_profile(name).profile == name


def test_lock_of_a_dead_process_is_broken(tmp_path: Path) -> None:
    """A run killed while holding a stage's lock must not block the next run forever."""
    script = (
        "import os, sys; sys.path.insert(0, sys.argv[1]);"
        "from pathlib import Path; from tasks.caching import LivenessFileLockManager as M;"
        "assert M(Path(sys.argv[2])).acquire_lock('k', holder='dead'); os._exit(137)"
    )
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", script, repo, str(tmp_path)], timeout=120)
    assert proc.returncode == 137
    assert (tmp_path / "k.lock").exists()
    manager = LivenessFileLockManager(tmp_path)
    t0 = time.monotonic()
    assert manager.acquire_lock("k", holder="alive", acquire_timeout=10)
    assert time.monotonic() - t0 < 5
    assert manager.is_lock_holder("k", "alive")


def test_lock_of_a_live_holder_is_respected(tmp_path: Path) -> None:
    first, second = LivenessFileLockManager(tmp_path), LivenessFileLockManager(tmp_path)
    assert first.acquire_lock("k", holder="one")
    assert not second.acquire_lock("k", holder="two", acquire_timeout=0.5)
    got: list[bool] = []
    waiter = threading.Thread(
        target=lambda: got.append(second.acquire_lock("k", holder="two", acquire_timeout=10))
    )
    waiter.start()
    time.sleep(0.5)
    assert got == []  # still waiting while "one" holds it (this process is alive)
    first.release_lock("k", holder="one")
    waiter.join(10)
    assert got == [True] and second.is_lock_holder("k", "two")
    assert os.listdir(tmp_path) == ["k.lock"]  # no temporary files left behind
