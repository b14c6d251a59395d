"""What a stage shows in the Prefect UI (docs/ui.md): a progress artifact while it runs, and
when it is done one artifact per stage, the documents its report declares, and its result in
the run log. The pipeline flow and the GPU child flows both publish through here.

Keys are stable, so `/artifacts/key/<key>` in the UI is the history of one thing:

| key | what | type |
|---|---|---|
| `glyph-<stage>-progress` | done / total while the stage runs | progress |
| `glyph-<stage>` | how it ended (ran or Cached), counts, drops, outputs with their paths | markdown |
| `glyph-evaluation` | the evaluation report with the plot embedded | markdown |
| `glyph-train-metrics` | loss, learning rate, speed per logging step | table |
| `glyph-pipeline-summary` | the run: every stage, Cached or ran, seconds, rows | markdown |

A Cached stage publishes its artifact too, saying so and linking the artifact of the run that
computed the result, and its report is drawn again from the store, so a fully cached run still
shows its evaluation. Paths are shown as text: a worker's `file://` path is not something a
browser can open.

Every call to the Prefect API made here is best effort: a failure (the server died or stopped
answering) is one warning, never the stage's failure, because the stage's outputs are in the
store already and the UI is only where people look at them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import get_client
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId
from prefect.settings import PREFECT_UI_URL

from glyph_core.errors import StorageError
from glyph_core.outputs import StageOutput
from glyph_core.reports import StageReport, stage_markdown, stages_table
from glyph_core.stages import get
from glyph_core.storage import Store
from tasks.runlog import run_logger

PREFIX = "glyph-"
SUMMARY_KEY = "glyph-pipeline-summary"
T = TypeVar("T")


log = logging.getLogger(__name__)


def best_effort(what: str, call: Callable[[], T]) -> T | None:
    """Run Prefect API calls for the UI; a failure is a warning, never the stage's failure.
    Returns the call's result, or None where it failed."""
    try:
        return call()
    except Exception as exc:
        log.warning(
            "%s: the Prefect API call failed (%s: %s); the stage goes on", what, type(exc).__name__, exc
        )
        return None


def artifact_key(name: str) -> str:
    return f"{PREFIX}{name}"


class ProgressArtifact:
    """`progress(done, total)` kept in one Prefect progress artifact per stage run, updated at
    most once a second (each update is an API call) and always at the end. After a failed
    update it stops calling the API, so a dead server costs one bounded wait, not one per step."""

    def __init__(self, stage: str, every_s: float = 1.0) -> None:
        self.stage = stage
        self.every_s = every_s
        self.artifact_id: Any = None
        self.last = 0.0
        self.broken = False

    def __call__(self, done: int, total: int) -> None:
        if not self.broken:
            self.broken = best_effort(f"{self.stage} progress", lambda: self._update(done, total)) is None

    def _update(self, done: int, total: int) -> bool:
        pct = 100.0 * done / total if total > 0 else 100.0
        now = time.monotonic()
        description = f"{self.stage}: {done}/{total}"
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=pct, key=artifact_key(f"{self.stage}-progress"), description=description
            )
            self.last = now
        elif now - self.last >= self.every_s or done >= total:
            update_progress_artifact(self.artifact_id, progress=pct, description=description)
            self.last = now
        return True


# ---------------------------------------------------------------------------------------------
# links into the UI


def ui_link(path: str) -> str:
    """An address in the UI: absolute where Prefect knows the UI's URL, else relative to it
    (the artifact is read in that UI, so a relative link still works there)."""
    base = PREFECT_UI_URL.value()
    return f"{str(base).rstrip('/')}{path}" if base else path


ORIGINS_DIR = "_origins"


def origin_uri(store: Store, stage: str, key: str) -> str:
    """Where the id of the artifact that holds a computed result is kept (one small JSON)."""
    return store.uri(ORIGINS_DIR, stage, f"{key}.json")


def computing_artifact(store: Store, stage: str, key: str) -> Any | None:
    """The `glyph-<stage>` artifact published by the run that computed this key, if this server
    has it: the id recorded when the stage ran, looked up by id (no search through the key's
    history)."""
    try:
        artifact_id = store.read_json(origin_uri(store, stage, key))["artifact_id"]
    except (StorageError, FileNotFoundError, KeyError, ValueError):
        return None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])), limit=1
        )
    return found[0] if found else None


def cached_note(store: Store, stage: str, key: str) -> str:
    """Where a cached result came from: the run that computed it and its artifact."""
    origin = computing_artifact(store, stage, key)
    if origin is None:
        return (
            f"Computed by an earlier run whose artifact is not on this server "
            f"(a `glyph {stage}` command, or a temporary server); the outputs below are that result."
        )
    run = f"[flow run]({ui_link(f'/runs/flow-run/{origin.flow_run_id}')})" if origin.flow_run_id else "a run"
    return (
        f"Computed by {run}: its [`{artifact_key(stage)}` artifact]"
        f"({ui_link(f'/artifacts/artifact/{origin.id}')}) holds that result."
    )


# ---------------------------------------------------------------------------------------------
# publishing


def stage_report(store: Store, out: StageOutput) -> StageReport | None:
    """The stage's declared report of this output, or None when it declares none."""
    report = get(out.stage).report
    return report(store, out) if report is not None else None


def publish_stage(store: Store, out: StageOutput, *, cached: bool = False) -> StageReport | None:
    """The stage's artifact, its report's documents and its headline in the run log (best effort)."""
    return best_effort(f"{out.stage} artifacts", lambda: _publish_stage(store, out, cached=cached))


def _publish_stage(store: Store, out: StageOutput, *, cached: bool) -> StageReport | None:
    logger = run_logger()
    report = stage_report(store, out)
    markdown = stage_markdown(out, cached=cached, report=report)
    if cached:
        markdown += "\n" + cached_note(store, out.stage, out.key) + "\n"
    artifact_id = create_markdown_artifact(
        key=artifact_key(out.stage),
        markdown=markdown,
        description=f"{out.stage} {'Cached' if cached else 'ran'}: key {out.key}",
    )
    if not cached:  # a later cached run links this artifact (cached_note)
        store.publish_bytes(
            origin_uri(store, out.stage, out.key), json.dumps({"artifact_id": str(artifact_id)}).encode()
        )
    if report is None:
        return None
    for doc in report.documents:
        if doc.table is not None:
            create_table_artifact(key=artifact_key(doc.key), table=doc.table, description=doc.description)
        else:
            create_markdown_artifact(
                key=artifact_key(doc.key), markdown=doc.markdown or "", description=doc.description
            )
    for line in report.headline:
        logger.info("%s", line)
    return report


def summary_markdown(summary: dict[str, Any], headline: list[str]) -> str:
    """The run at a glance: every stage, Cached or ran, seconds and rows; the evaluation's headline."""
    lines = [f"### glyph pipeline, profile `{summary['profile']}`", "", f"Store `{summary['store']}`"]
    if summary.get("changed_sources"):
        lines += ["", "Started because these sources changed: " + ", ".join(summary["changed_sources"])]
    lines += ["", *stages_table(summary["stages"])]
    if headline:
        lines += ["", "Result (artifact `glyph-evaluation` has the whole report and the plot):", ""]
        lines += [f"- {line}" for line in headline]
    return "\n".join(lines) + "\n"


def publish_summary(summary: dict[str, Any], headline: list[str]) -> None:
    best_effort(
        "summary",
        lambda: create_markdown_artifact(
            key=SUMMARY_KEY,
            markdown=summary_markdown(summary, headline),
            description=f"profile {summary['profile']} on {summary['store']}: every stage, Cached or ran",
        ),
    )
