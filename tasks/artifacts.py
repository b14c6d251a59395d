"""What a stage shows in the Prefect UI: one progress artifact while it runs, and when it is
done a table (rows in/out, drops by reason, seconds), a link to its main output and a list of
every ref. The pipeline's tasks and the GPU child flows both use these."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from glyph_core.outputs import StageOutput
from glyph_core.storage import DatasetRef, Store

log = logging.getLogger(__name__)


def _best_effort(what: str, call: Callable[[], Any]) -> bool:
    """Run one Prefect API call for the UI; a failure (the server died or stopped answering) is a
    warning, never the stage's failure: the stage's work is done or going on, and its outputs
    are in the store, not in the UI. Returns whether the call went through."""
    try:
        call()
    except Exception as exc:
        log.warning(
            "%s: the Prefect API call failed (%s: %s); the stage goes on", what, type(exc).__name__, exc
        )
        return False
    return True


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
            self.broken = not _best_effort(f"{self.stage} progress", lambda: self._update(done, total))

    def _update(self, done: int, total: int) -> None:
        pct = 100.0 * done / total if total > 0 else 100.0
        now = time.monotonic()
        description = f"{self.stage}: {done}/{total}"
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=pct, key=f"glyph-{self.stage}-progress", description=description
            )
            self.last = now
        elif now - self.last >= self.every_s or done >= total:
            update_progress_artifact(self.artifact_id, progress=pct, description=description)
            self.last = now


def publish_artifacts(store: Store, out: StageOutput) -> None:
    """A table, a link to the main output and a list of every ref: what a person looks for in
    the UI when a stage ran. Best effort: the outputs are published already."""
    _best_effort(f"{out.stage} artifacts", lambda: _publish_artifacts(store, out))


def _publish_artifacts(store: Store, out: StageOutput) -> None:
    s = out.stats
    row = {
        "stage": out.stage,
        "rows_in": s.rows_in,
        "rows_out": s.rows_out,
        "errors": s.errors,
        "seconds": round(s.seconds, 3),
        **{f"drop_{k}": v for k, v in s.drops.items()},
    }
    create_table_artifact(
        key=f"glyph-{out.stage}",
        table=[row],
        description=f"{out.stage} (key {out.key}): rows in/out, drops by reason, seconds",
    )
    main = out.ref
    create_link_artifact(
        key=f"glyph-{out.stage}-output",
        link=store.link(main.uri),
        link_text=main.uri,
        description=f"{out.stage} output, sha256 {main.sha256[:12]}",
    )
    lines = [
        f"### {out.stage} → `{store.link(main.uri)}`",
        "",
        "| name | uri | sha256 | rows |",
        "|---|---|---|---|",
    ]
    for name, ref in out.refs.items():
        rows = ref.rows if isinstance(ref, DatasetRef) else ref.kind
        lines.append(f"| {name} | `{ref.uri}` | `{ref.sha256[:16]}` | {rows} |")
    if s.extra:
        lines += ["", "```", *(f"{k}: {v}" for k, v in s.extra.items()), "```"]
    create_markdown_artifact(markdown="\n".join(lines), description=f"{out.stage} outputs")
