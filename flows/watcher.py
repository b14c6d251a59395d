"""The dataset watcher (docs/design.md, "The dataset watcher"): fingerprint each source, emit
`glyph.dataset.changed` on change.

Deployed on a cron schedule (deployments/prefect.yaml). It watches what the pipeline reads: by
default the data location and sources of the pipeline deployment's own parameters (its profile
and overrides, `glyph-pipeline/default`; the flow's defaults when there is no such deployment),
so the location is set in one place. Each run computes one fingerprint per source and compares
it with the value kept in a Prefect Variable:

- local files: sha256 over every file of `{data_dir}/{source}/` (relative path and bytes,
  sorted), so an edited, added or removed file changes the fingerprint; the same per-file hashes
  key the unify stage (`glyph_core.fingerprints`);
- the Hub (the pipeline reads no local folder): the commit sha of each dataset repository at
  its pinned revision (MATH also watches MATH-500).

Only when a fingerprint differs from the stored one is the event emitted, with the changed sources
in the payload; the pipeline deployment's trigger starts a run with them as its `changed_sources`
parameter. The Variable is updated after the event is emitted, so a failed emit is retried by the
next run rather than lost (a duplicate event costs a fully cached pipeline run: seconds).

A source that cannot be read (the Hub unreachable, a folder missing) ends the run Failed with
one line naming it and why; the other sources are still compared and recorded.

First run (no stored value for a source): the fingerprint is recorded and, by default, nothing is
emitted. Deploying the watcher must not start a full pipeline run by itself; the first pipeline
run is started on purpose. `emit_on_first_run=True` changes that.

The fingerprints are computed in `glyph_core.fingerprints` (no Prefect); this module is the flow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound
from prefect.states import Failed, State
from prefect.variables import Variable

from flows.pipeline import DEFAULT_PROFILE
from glyph_core.config import UnifyConfig
from glyph_core.errors import GlyphError
from glyph_core.fingerprints import source_fingerprints
from glyph_core.profiles import load_profile

EVENT = "glyph.dataset.changed"
DEFAULT_VARIABLE = "glyph_dataset_fingerprints"
PIPELINE_DEPLOYMENT = "glyph-pipeline/default"


def location_key(data_dir: str | None) -> str:
    """Where the sources are read from: stored fingerprints are per location."""
    return f"local:{Path(data_dir).expanduser().resolve()}" if data_dir else "hub"


def diff(previous: dict[str, str], current: dict[str, str]) -> tuple[list[str], list[str]]:
    """(changed sources, sources seen for the first time)."""
    new = sorted(s for s in current if s not in previous)
    changed = sorted(s for s in current if s in previous and previous[s] != current[s])
    return changed, new


def pipeline_sources(deployment: str) -> tuple[str | None, list[str], str]:
    """(data folder or None for the Hub, sources, whose settings) of the pipeline: its
    deployment's parameters where it is deployed, the flow's defaults otherwise."""
    params: dict[str, Any] = {}
    whose = f"the pipeline's default profile {DEFAULT_PROFILE!r}"
    try:
        with get_client(sync_client=True) as client:
            params = dict(client.read_deployment_by_name(deployment).parameters or {})
        whose = f"the parameters of {deployment}"
    except ObjectNotFound:
        pass
    cfg = load_profile(str(params.get("profile", DEFAULT_PROFILE)), params.get("overrides") or {})
    unify = cfg.stage_config("unify")
    if not isinstance(unify, UnifyConfig):
        raise GlyphError(f"the pipeline's unify settings are not a UnifyConfig: {type(unify).__name__}")
    return unify.data_dir, list(unify.sources), whose


def fingerprints(
    sources: list[str], data_dir: str | None, revisions: Any
) -> tuple[dict[str, str], list[str]]:
    """One fingerprint per readable source, and one line per source that could not be read."""
    current: dict[str, str] = {}
    errors: list[str] = []
    where = f"in {data_dir}" if data_dir else "on the Hugging Face Hub"
    for source in sources:
        try:
            current.update(source_fingerprints([source], data_dir, revisions))
        except Exception as exc:  # unreachable or missing: named, the others still compared
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors.append(f"{source} {where}: {type(exc).__name__}{': ' + detail if detail else ''}")
    return current, errors


@flow(name="glyph-dataset-watcher", log_prints=True)
def watch_datasets(
    sources: list[str] | None = None,
    data_dir: str | None = None,
    revisions: dict[str, str | None] | None = None,
    variable: str = DEFAULT_VARIABLE,
    emit_on_first_run: bool = False,
    pipeline_deployment: str = PIPELINE_DEPLOYMENT,
) -> dict[str, Any] | State:
    """Emit `glyph.dataset.changed` when a source's fingerprint differs from the stored one.

    Args:
        sources: the sources to watch; default the pipeline's (`unify.sources`).
        data_dir: a data folder to watch; default the one the pipeline reads (its deployment's
            profile and overrides), which may be the Hub.
        revisions: Hub revisions per dataset, where not the pinned ones.
        variable: the Prefect Variable that keeps the fingerprints.
        emit_on_first_run: emit for sources seen for the first time too.
        pipeline_deployment: whose data location and sources are watched by default.
    """
    logger = get_run_logger()
    if data_dir is None or not sources:
        pipeline_dir, pipeline_list, whose = pipeline_sources(pipeline_deployment)
        if data_dir is None:
            data_dir = pipeline_dir
            logger.info("watching %s, the data location of %s", location_key(data_dir), whose)
        sources = sources or pipeline_list
    location = location_key(data_dir)
    current, errors = fingerprints(sources, data_dir, revisions)

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
    elif current:
        logger.info("no dataset change (%s)", ", ".join(f"{s}={current[s][:19]}" for s in sorted(current)))

    if changed or new:
        stored[location] = {**previous, **current}
        Variable.set(variable, stored, overwrite=True)
    if errors:
        message = "cannot read " + "; ".join(errors)
        logger.error("%s", message)
        return Failed(message=message)
    return {"changed": changed, "new": new, "emitted": bool(to_report), "event_id": event_id}


if __name__ == "__main__":
    watch_datasets()
