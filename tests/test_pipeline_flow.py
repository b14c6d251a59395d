"""Flow semantics of the pipeline on a local store (prefect_test_harness, the `tiny` profile,
the real stage functions): caching keyed on content, retries without redoing, refresh,
crash safety and concurrent runs (docs/design.md, "The cache key").

Executions are counted by the tasks' test hook (`GLYPH_TEST_EXEC_LOG`): a task body that runs
appends its stage name, a cache hit does not, so "ran once" is a count, not an inference from
state names alone. Both are checked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pipeline_helpers import (  # noqa: F401
    ExecLog,
    api_env,
    cached,
    exec_log,
    harness,
    make_tiny_data,
    real_data_dir,
    recorded_store,
    run,
)

from glyph_core.errors import GlyphError
from glyph_core.stages import names
from tasks.faults import FAULT_DIR_ENV

REPO = Path(__file__).resolve().parents[1]

STAGES = names()


@dataclass
class Warm:
    store: str
    data: Path
    log: ExecLog
    cold: dict[str, Any]
    root: Path


@pytest.fixture(scope="module")
def warm(harness: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warm]:  # noqa: F811
    """One cold run of the whole `tiny` pipeline, shared by the tests that only add runs to it."""
    root = tmp_path_factory.mktemp("warm")
    with recorded_store(root) as (data, log, store):
        cold = run(store, data)
        yield Warm(store=store, data=data, log=log, cold=cold, root=root)


def _ran(log: ExecLog, before: Counter[str]) -> Counter[str]:
    return log.counts() - before


def test_cold_run_runs_every_stage_once(warm: Warm) -> None:
    assert cached(warm.cold) == dict.fromkeys(STAGES, False)
    assert warm.log.counts() == Counter(STAGES)
    evaluate = warm.cold["stages"][-1]
    assert evaluate["rows_out"] > 0 and Path(evaluate["uri"]).is_file()


def test_train_and_generate_report_progress_to_their_artifacts(warm: Warm) -> None:
    """Every optimizer step of train and every shard of generate reaches the stage's progress
    artifact (`glyph-<stage>-progress`), which ends at 100 %."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        for stage in ("train", "generate"):
            (artifact,) = client.read_latest_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"glyph-{stage}-progress"]))
            )
            assert artifact.type == "progress" and artifact.data == 100.0, (stage, artifact)
            assert artifact.description.startswith(f"{stage}: ")


def test_a_declared_stage_joins_the_pipeline(warm: Warm) -> None:
    """A test-only stage (tests/stage_example.py: a module, a config, one declaration) gets its
    task, cache key, wiring and config from the declaration: it runs after the six cached ones
    on the refs its inputs name, with a `--set` override, and comes back Cached next time."""
    from glyph_core.stages import registered
    from tests.stage_example import LENGTHS

    with registered(LENGTHS):
        before = warm.log.counts()
        first = run(warm.store, warm.data, **{"lengths.min_chars": 5})
        assert cached(first) == {**dict.fromkeys(STAGES, True), "lengths": False}
        assert _ran(warm.log, before) == Counter(["lengths"])
        rows = {r["stage"]: r for r in first["stages"]}
        assert rows["lengths"]["rows_in"] == rows["rewrite"]["rows_out"]  # it got rewrite's sft
        assert Path(rows["lengths"]["refs"]["lengths"]).is_file()
        again = run(warm.store, warm.data, **{"lengths.min_chars": 5})
        assert cached(again)["lengths"] is True
        assert _ran(warm.log, before) == Counter(["lengths"])
    assert [r["stage"] for r in run(warm.store, warm.data)["stages"]] == list(STAGES)


def test_second_run_with_nothing_changed_is_all_cached(warm: Warm) -> None:
    before = warm.log.counts()
    again = run(warm.store, warm.data)
    print(f"\ncold run {warm.cold['wall']:.2f}s, fully cached rerun {again['wall']:.2f}s")
    for row in again["stages"]:
        print(f"  {row['stage']:9s} cached={row['cached']} {row['seconds']:.3f}s")
    assert cached(again) == dict.fromkeys(STAGES, True)
    assert _ran(warm.log, before) == Counter()
    # A cached stage hands on exactly the refs the cold run produced.
    assert [r["refs"] for r in again["stages"]] == [r["refs"] for r in warm.cold["stages"]]
    assert again["wall"] < warm.cold["wall"]


def test_same_input_bytes_at_another_path_is_cached(warm: Warm, tmp_path: Path) -> None:
    moved = shutil.copytree(warm.data, tmp_path / "elsewhere" / "data")
    before = warm.log.counts()
    again = run(warm.store, moved)
    assert cached(again) == dict.fromkeys(STAGES, True)
    assert _ran(warm.log, before) == Counter()


def test_changed_source_bytes_rerun_unify(warm: Warm, tmp_path: Path) -> None:
    """The other side of the previous test: the key is the content, so an edit is seen."""
    changed = shutil.copytree(warm.data, tmp_path / "changed")
    path = changed / "gsm8k" / "test.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    before = warm.log.counts()
    again = run(warm.store, changed)
    assert cached(again)["unify"] is False
    assert _ran(warm.log, before)["unify"] == 1


def test_changed_teacher_config_reruns_generate_and_its_consumers_not_unify(warm: Warm) -> None:
    before = warm.log.counts()
    again = run(warm.store, warm.data, **{"generate.teacher.temperature": 0.2})
    state = cached(again)
    assert state["unify"] is True
    assert state["generate"] is False and state["filter"] is False and state["rewrite"] is False
    assert _ran(warm.log, before)["unify"] == 0
    assert all(_ran(warm.log, before)[s] == 1 for s in ("generate", "filter", "rewrite"))
    # The reference teacher ignores temperature, so rewrite writes byte-identical SFT rows; the
    # content key then (rightly) serves train and evaluate from cache: no retraining on equal data.
    old, new = ({r["stage"]: r for r in s["stages"]} for s in (warm.cold, again))
    assert old["generate"]["key"] != new["generate"]["key"]
    if new["train"]["key"] == old["train"]["key"]:  # train's key holds the SFT rows' sha256
        assert state["train"] is True and state["evaluate"] is True
    else:
        assert state["train"] is False and state["evaluate"] is False


def test_refresh_filter_reruns_filter_and_later_stages(warm: Warm) -> None:
    before = warm.log.counts()
    again = run(warm.store, warm.data, refresh=["filter"])
    assert cached(again) == {
        "unify": True,
        "generate": True,
        "filter": False,
        "rewrite": False,
        "train": False,
        "evaluate": False,
    }
    assert _ran(warm.log, before) == Counter(["filter", "rewrite", "train", "evaluate"])


def test_unknown_refresh_stage_fails_before_running(warm: Warm) -> None:
    """`refresh` is typed with the stage names: Prefect refuses the run before the flow starts
    (a deployment's run is refused when it is created; the schema is tested in test_ui_reports)."""
    from prefect.exceptions import ParameterTypeError

    before = warm.log.counts()
    with pytest.raises(ParameterTypeError, match="refresh"):
        run(warm.store, warm.data, refresh=["filtr"])
    assert _ran(warm.log, before) == Counter()


def test_transient_failure_is_retried_by_the_task(
    warm: Warm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A config change that gives filter a new key but the same output, so the rerun stays cheap.
    monkeypatch.setenv(FAULT_DIR_ENV, str(tmp_path))
    (tmp_path / "filter.transient").touch()
    before = warm.log.counts()
    again = run(warm.store, warm.data, **{"filter.max_completion_tokens": 1000})
    assert cached(again)["filter"] is False
    assert _ran(warm.log, before)["filter"] == 2  # failed once with OSError, retried, succeeded


def test_glyph_error_is_not_retried(warm: Warm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_DIR_ENV, str(tmp_path))
    (tmp_path / "filter.fatal").touch()
    before = warm.log.counts()
    with pytest.raises(GlyphError, match="injected"):
        run(warm.store, warm.data, **{"filter.max_completion_tokens": 999})
    assert _ran(warm.log, before) == Counter(["filter"])


def test_deleted_artifact_behind_a_cache_entry_is_recomputed(warm: Warm) -> None:
    """A cache record that outlives its artifact must not be trusted."""
    rows = {r["stage"]: r for r in warm.cold["stages"]}
    kept = Path(rows["filter"]["refs"]["kept"])
    kept.unlink()
    before = warm.log.counts()
    again = run(warm.store, warm.data)
    assert cached(again)["filter"] is False
    assert _ran(warm.log, before)["filter"] == 1
    assert kept.is_file()
    assert all(cached(again)[s] for s in ("unify", "generate", "rewrite", "train", "evaluate"))


def test_damaged_result_record_is_not_trusted(warm: Warm) -> None:
    """A Prefect result record cut short (a crash while Prefect wrote it) reads as a miss."""
    records = Path(warm.store) / "_prefect" / "results"
    damaged = 0
    for path in records.iterdir():
        text = path.read_text()
        result = json.loads(json.loads(text)["result"])
        if isinstance(result, dict) and result.get("data", {}).get("stage") == "rewrite":
            path.write_text(text[: len(text) // 2])
            damaged += 1
    assert damaged >= 1
    before = warm.log.counts()
    again = run(warm.store, warm.data)
    assert cached(again)["rewrite"] is False
    assert _ran(warm.log, before)["rewrite"] == 1


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    import glyph_core.storage as storage
    real_replace = os.replace
    def dying_replace(src, dst):
        if "/rewrite/" in str(dst):
            os._exit(137)  # killed after the bytes hit the temp file, before publishing
        return real_replace(src, dst)
    storage.os.replace = dying_replace
    from pipeline_helpers import run
    from pathlib import Path
    run({store!r}, Path({data!r}), **{{"rewrite.seed": 7}})
    """
)


def test_crash_while_writing_leaves_nothing_trusted(warm: Warm) -> None:
    script = CRASH_SCRIPT.format(
        repo=str(REPO), tests=str(REPO / "tests"), store=warm.store, data=str(warm.data)
    )
    before = warm.log.counts()
    rewrite_dir = Path(warm.store) / "rewrite"
    existing = set(rewrite_dir.iterdir())
    proc = subprocess.run(
        [sys.executable, "-c", script], env=api_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert _ran(warm.log, before)["rewrite"] == 1
    # Nothing was published under the crashed attempt's key: only its temp file remains.
    (crashed,) = set(rewrite_dir.iterdir()) - existing
    assert not (crashed / "sft.parquet").exists()
    assert [p.name.startswith(".sft.parquet.tmp-") for p in crashed.iterdir()] == [True]
    # The next run does not trust the crashed attempt: rewrite runs again and publishes.
    again = run(warm.store, warm.data, **{"rewrite.seed": 7})
    assert cached(again)["rewrite"] is False
    assert _ran(warm.log, before)["rewrite"] == 2
    new = {r["stage"]: r for r in again["stages"]}["rewrite"]
    assert Path(new["uri"]) == crashed / "sft.parquet" and Path(new["uri"]).is_file()


def test_failure_in_train_then_flow_retry_reruns_only_train(
    harness: None,  # noqa: F811
    exec_log: ExecLog,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline_helpers import tiny_overrides
    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline

    data = make_tiny_data(real_data_dir(), tmp_path / "data")
    log = exec_log
    monkeypatch.setenv(FAULT_DIR_ENV, str(tmp_path))
    (tmp_path / "train.fatal").touch()
    state = pipeline.with_options(retries=1, retry_delay_seconds=0)(
        profile="tiny", store=str(tmp_path / "store"), overrides=tiny_overrides(data), return_state=True
    )
    assert state.is_completed(), state
    summary = state.result()
    assert log.counts() == Counter(
        {"unify": 1, "generate": 1, "filter": 1, "rewrite": 1, "train": 2, "evaluate": 1}
    )
    # The retry was the same flow run (run_count 2), and it found the first four stages Cached.
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert flow_run.run_count == 2
    assert cached(summary) == {
        "unify": True,
        "generate": True,
        "filter": True,
        "rewrite": True,
        "train": False,
        "evaluate": False,
    }


def test_concurrent_runs_with_the_same_inputs_compute_each_stage_once(
    harness: None,  # noqa: F811
    exec_log: ExecLog,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = make_tiny_data(real_data_dir(), tmp_path / "data")
    log = exec_log
    store = str(tmp_path / "store")
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(run(store, data))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    assert len(results) == 2
    assert log.counts() == Counter(STAGES), log.counts()
    for stage in STAGES:
        states = sorted(cached(r)[stage] for r in results)
        assert states == [False, True], (stage, states)
    assert json.dumps([r["refs"] for r in results[0]["stages"]]) == json.dumps(
        [r["refs"] for r in results[1]["stages"]]
    )
