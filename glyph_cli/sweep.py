"""`glyph sweep`: one pipeline run per grid point, compared in one table and one plot
(docs/sweep.md); and `glyph report --sweep`, which shows a finished sweep again.

    glyph sweep --profile demo --grid rewrite.natural_ratio=0.5,1,2 --grid train.epochs=3,6
    glyph sweep --file benchmarks/sweep_study.yaml --set evaluate.backend=vllm --out results/sweep
    glyph report --sweep last            # or a sweep's flow-run id or name, or a kept folder

Every point's settings are validated before Prefect starts, so a typo in the 7th point fails in
a second rather than after six trainings. The Prefect side (server on demand, `--no-server`) is
the same as `glyph run`'s.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import typer

from glyph_cli.common import (
    DebugOpt,
    QuietOpt,
    ServerOpt,
    StoreOpt,
    debug_enabled,
    fail,
    reported_errors,
    set_debug,
)
from glyph_cli.pipeline import api_url_for, ensure_zombie_automation, prefect_defaults, terminal_logs
from glyph_cli.run_summary import open_store
from glyph_cli.server import ServerError
from glyph_core.errors import GlyphError
from glyph_core.profiles import PROFILES, parse_sets
from glyph_core.stages import refresh_set
from glyph_core.sweep import (
    SweepSpec,
    find_sweep,
    load_metrics,
    load_spec,
    parse_grid,
    plan_sweep,
    render,
    write_folder,
)


def show_sweep(ref: str, store: str | None, out: Path | None) -> dict[str, Any]:
    """Print a sweep's comparison (from its points' metrics.json) and, with `out`, write the
    folder a study keeps (table.md, frontier.png, sweep.json, each point's metrics); returns the
    sweep's record."""
    st = open_store(store)
    record, folder = find_sweep(ref, st)
    metrics = load_metrics(record, st, folder)
    markdown, png, _, best = render(record, metrics)
    typer.echo(markdown)
    if out is not None:
        typer.echo(f"written: {write_folder(out, record, metrics, markdown, png)}")
    elif folder is None:
        typer.echo(
            f"record: {st.uri('_sweeps', record['id'], 'sweep.json')} (table.md and frontier.png beside it)"
        )
    missing = [p["name"] for p in record["points"] if p["state"] == "completed" and p["name"] not in metrics]
    if missing:
        fail(f"metrics of completed point(s) {', '.join(missing)} not found; their rows are empty")
    return record


def sweep_cmd(
    profile: str | None = typer.Option(
        None, "--profile", "-p", help=" | ".join(PROFILES) + " (default: the file's, else tiny)"
    ),
    file: Path | None = typer.Option(
        None, "--file", "-f", help="sweep file (YAML): profile, set, grid, points (docs/sweep.md)"
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="a setting for every point: key.path=value (repeatable)"
    ),
    grid: list[str] = typer.Option(
        [], "--grid", help="a swept setting: key.path=v1,v2,... (repeatable; every combination is a point)"
    ),
    store: StoreOpt = None,
    refresh: list[str] = typer.Option(
        [], "--refresh", help="every point recomputes this stage and every later one (repeatable)"
    ),
    max_parallel: int = typer.Option(2, "--max-parallel", min=1, help="points in flight at once"),
    deployment: str | None = typer.Option(
        None,
        "--deployment",
        help="run each point as a run of glyph-pipeline/<name> on the work pools (e.g. default); "
        "default: as subflows in this process",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="also write table.md, frontier.png, sweep.json and each point's metrics here"
    ),
    quiet: QuietOpt = False,
    server: ServerOpt = True,
    debug: DebugOpt = False,
) -> None:
    """Run the pipeline once per grid point (shared stages cached once) and compare the points."""
    set_debug(debug)
    prefect_defaults(quiet)
    with reported_errors(code=2):
        spec = load_spec(file) if file else SweepSpec()
        base = profile or spec.profile or "tiny"
        sets = {**spec.set, **parse_sets(set_)}
        swept = {**spec.grid, **parse_grid(grid)}
        plan = plan_sweep(base, sets, swept, spec.points)
        refresh_set(list(refresh))  # unknown stage names fail here, before Prefect starts
    typer.echo(f"sweep of {len(plan.points)} points on profile {base}:")
    for p in plan.points:
        typer.echo(f"  {p.name}: {p.label(plan.swept)}")
    try:
        api_url, own_server = api_url_for(server)
    except ServerError as exc:
        fail(f"{exc}; or run with --no-server to use Prefect's temporary server")

    # Imported only now, as in `glyph run`: Prefect and the flows take seconds to import.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.sweep import sweep
    from tasks.artifacts import ui_link

    terminal_logs(debug=debug_enabled(), quiet=quiet)
    logging.getLogger("glyph_core").setLevel(logging.INFO)  # as in `glyph run`: progress lines
    command = "glyph " + shlex.join(sys.argv[1:])
    updates = {PREFECT_API_URL: api_url} if api_url else {}
    state: Any = None
    with temporary_settings(updates=updates), reported_errors():  # type: ignore[arg-type]
        if own_server:
            ensure_zombie_automation()  # as `glyph run` does on the local server it started
        state = sweep(
            profile=base,
            store=store,
            sets=plan.sets,
            grid=plan.grid,
            points=plan.explicit,
            refresh=list(refresh),
            max_parallel=max_parallel,
            pipeline_deployment=deployment,
            command=command,
            return_state=True,
        )
        run_id = str(state.state_details.flow_run_id)
        page = ui_link(f"/runs/flow-run/{run_id}")  # absolute where Prefect knows the UI's address
    try:
        record = show_sweep(run_id, store, out)
    except GlyphError as exc:  # the sweep failed before it recorded anything
        try:
            state.result()
        except Exception as cause:
            fail(cause)
        fail(exc)
    if "://" in page:
        typer.echo(f"Prefect UI: {page}  (sweep {record['name']}; its points are its subflow runs)")
    if not state.is_completed():
        try:
            state.result()
        except Exception as exc:
            fail(exc)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_cmd)
