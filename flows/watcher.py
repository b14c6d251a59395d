"""The dataset watcher (docs/design.md, "The dataset watcher"): fingerprint each source, emit `glyph.dataset.changed` on change.

Deployed on a cron schedule (deployments/prefect.yaml). Each run computes one fingerprint per
configured source and compares it with the value kept in a Prefect Variable:

- local files (`data_dir` given): sha256 over every file of `{data_dir}/{source}/` (relative path
  and bytes, sorted), so an edited, added or removed file changes the fingerprint; the same
  per-file hashes key the unify stage (`glyph_core.fingerprints`);
- the Hub (`data_dir` None): the commit sha of the dataset repository at the configured revision,
  `huggingface_hub.HfApi().dataset_info(id, revision=...).sha` (MATH also watches MATH-500).

Only when a fingerprint differs from the stored one is the event emitted, with the changed sources
in the payload; the pipeline deployment has a trigger on it. The Variable is updated after the
event is emitted, so a failed emit is retried by the next run rather than lost (a duplicate
event costs a fully cached pipeline run: seconds).

First run (no stored value for a source): the fingerprint is recorded and, by default, nothing is
emitted. Deploying the watcher must not start a full pipeline run by itself; the first pipeline
run is started on purpose. `emit_on_first_run=True` changes that.

The fingerprints are computed in `glyph_core.fingerprints` (no Prefect); this module is the flow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.variables import Variable

from glyph_core.fingerprints import source_fingerprints

EVENT = "glyph.dataset.changed"
DEFAULT_VARIABLE = "glyph_dataset_fingerprints"
DEFAULT_SOURCES = ["gsm8k", "svamp", "math"]


def location_key(data_dir: str | None) -> str:
    """Where the sources are read from: stored fingerprints are per location."""
    return f"local:{Path(data_dir).expanduser().resolve()}" if data_dir else "hub"


def diff(previous: dict[str, str], current: dict[str, str]) -> tuple[list[str], list[str]]:
    """(changed sources, sources seen for the first time)."""
    new = sorted(s for s in current if s not in previous)
    changed = sorted(s for s in current if s in previous and previous[s] != current[s])
    return changed, new


@flow(name="glyph-dataset-watcher", log_prints=True)
def watch_datasets(
    sources: list[str] = DEFAULT_SOURCES,  # noqa: B006 -- flow parameters are copied by Prefect
    data_dir: str | None = None,
    revisions: dict[str, str | None] | None = None,
    variable: str = DEFAULT_VARIABLE,
    emit_on_first_run: bool = False,
) -> dict[str, Any]:
    """Emit `glyph.dataset.changed` when a source's fingerprint differs from the stored one."""
    logger = get_run_logger()
    location = location_key(data_dir)
    current = source_fingerprints(sources, data_dir, revisions)

    stored: dict[str, Any] = Variable.get(variable, default={}) or {}
    previous: dict[str, str] = dict(stored.get(location, {}))
    changed, new = diff(previous, current)
    to_report = changed + (new if emit_on_first_run else [])

    event_id = None
    if to_report:
        event = emit_event(
            event=EVENT,
            resource={
                "prefect.resource.id": f"glyph.datasets.{location}",
                "prefect.resource.name": location,
            },
            payload={
                "changed": sorted(to_report),
                "new": new,
                "data_dir": data_dir,
                "fingerprints": {s: current[s] for s in sorted(to_report)},
                "previous": {s: previous.get(s) for s in sorted(to_report)},
            },
        )
        event_id = str(event.id) if event else None
        logger.info("datasets changed: %s; emitted %s (%s)", ", ".join(to_report), EVENT, event_id)
    elif new:
        logger.info("first fingerprints recorded, nothing emitted: %s", ", ".join(new))
    else:
        logger.info("no dataset change (%s)", ", ".join(f"{s}={current[s][:19]}" for s in sorted(current)))

    if changed or new:
        stored[location] = {**previous, **current}
        Variable.set(variable, stored, overwrite=True)
    return {"changed": changed, "new": new, "emitted": bool(to_report), "event_id": event_id}


if __name__ == "__main__":
    watch_datasets()
