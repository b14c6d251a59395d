"""Unify's key names the Hub commit it reads, so a dataset that changes on the Hub recomputes.

Before: the dataset watcher fingerprinted the Hub commit, but unify keyed on the dataset id and
the pinned revision, which is None (the default branch) for every source: the run the watcher
triggered brought unify back Cached with the old data.

The Hub cannot be reached from here. The code that asks it (`fingerprints.hub_commit`) is the
real one and is exercised offline for its error line; the key logic gets the resolution
function injected: `stand_in` below plays the Hub (which commit a revision names now), and
`fake_load_dataset` plays `datasets.load_dataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from glyph_core import unify
from glyph_core.config import UnifyConfig
from glyph_core.errors import SourceError
from glyph_core.fingerprints import fingerprint_sources, hub_commit, source_fingerprints
from glyph_core.storage import Store

OLD, NEW = "a" * 40, "b" * 40


def stand_in(
    commit: str, log: list[tuple[str, str | None]] | None = None
) -> Callable[[str, str | None], str]:
    """Stand-in for the Hub: every dataset's revision names `commit` now."""

    def resolve(hub_id: str, revision: str | None) -> str:
        if log is not None:
            log.append((hub_id, revision))
        return commit

    return resolve


def fake_load_dataset(calls: list[tuple[str, str | None, str, str | None]]):  # type: ignore[no-untyped-def]
    """Stand-in for `datasets.load_dataset`: a few GSM8K rows per split, and the call recorded."""

    def load(hub_id: str, config: str | None, split: str, revision: str | None) -> list[dict[str, str]]:
        calls.append((hub_id, config, split, revision))
        return [
            {"question": f"{split} question {i} at {revision}", "answer": f"s\n#### {i}"} for i in range(3)
        ]

    return load


HUB = UnifyConfig(data_dir=None, sources=["gsm8k"], svamp_holdout=0)


def test_the_key_follows_the_commit_the_revision_names() -> None:
    asked: list[tuple[str, str | None]] = []
    old = unify.key(HUB, resolve=stand_in(OLD, asked))
    assert asked == [("openai/gsm8k", None)]  # the pinned revision (None: the default branch)
    assert unify.key(HUB, resolve=stand_in(OLD)) == old
    assert unify.key(HUB, resolve=stand_in(NEW)) != old  # the dataset changed on the Hub
    assert fingerprint_sources(HUB, stand_in(OLD)).revisions == {"gsm8k": OLD}


def test_math_is_keyed_on_math500_too() -> None:
    cfg = UnifyConfig(data_dir=None, sources=["math"])
    asked: list[tuple[str, str | None]] = []
    fingerprint_sources(cfg, stand_in(OLD, asked))
    assert [hub for hub, _ in asked] == ["EleutherAI/hendrycks_math", "HuggingFaceH4/MATH-500"]


def test_unify_reads_exactly_the_commit_its_key_names(tmp_path: Path) -> None:
    store = Store(tmp_path / "store").ensure()
    calls: list[tuple[str, str | None, str, str | None]] = []
    out = unify.run(store, HUB, resolve=stand_in(NEW), load=fake_load_dataset(calls))
    assert out.key == unify.key(HUB, resolve=stand_in(NEW))
    assert {revision for *_, revision in calls} == {NEW}  # not the branch name, the commit
    problems = store.read_table(out.refs["problems"])  # type: ignore[arg-type]
    assert all(q.endswith(f"at {NEW}") for q in problems.column("question").to_pylist())


def test_watcher_and_unify_see_the_same_change() -> None:
    before, after = (source_fingerprints(["gsm8k"], None, resolve=stand_in(c)) for c in (OLD, NEW))
    assert before != after and before["gsm8k"] == f"hub:openai/gsm8k@{OLD}"
    assert (unify.key(HUB, resolve=stand_in(OLD)) != unify.key(HUB, resolve=stand_in(NEW))) == (
        before != after
    )


def test_an_unreachable_hub_is_one_line_naming_the_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real resolution code, offline: a `SourceError` instead of a network traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as exc:
        hub_commit("openai/gsm8k", None)
    message = str(exc.value)
    assert message.startswith("hf://openai/gsm8k@main: cannot resolve the revision on the Hub")
    assert "unify.data_dir" in message and "\n" not in message
