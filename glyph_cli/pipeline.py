"""`glyph run`: the whole pipeline with a profile, on a local directory or an object store.

Prefect needs no server started by hand. Without `PREFECT_API_URL`, `glyph run` starts a local
Prefect server in the background on first use (glyph_cli/server.py: `prefect server start` on
127.0.0.1:4200, SQLite, log and pid file under `PREFECT_HOME`) and reuses it on later runs, so
a cached rerun does not pay Prefect's ~11 s temporary-server start-up, and the person can open
the UI and see the same run. `--no-server` (or `GLYPH_SERVER=0`) keeps Prefect's temporary
in-process server instead (what the tests want: nothing left running). We keep Prefect's home
where Prefect users expect it rather than under the store: the store may be an S3 bucket, and
one run history across stores is what a person browsing the UI wants.

The run ends with the stage table, the evaluation table (base vs tuned per bucket), the
selectivity numbers, the plot's path and the flow run's UI address, and saves all of that to
`{store}/_runs/last.json` for `glyph report`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer


def _prefect_defaults(quiet: bool) -> None:
    """Settings for a fresh machine; each only where the user has not set it (env wins)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The stages log through `glyph_core.*` loggers (train: "step 5/40 loss ..."; evaluate: each
    # model's generation); Prefect shows them in the terminal and in the UI's run logs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "glyph_core")
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def print_summary(summary: dict[str, Any]) -> None:
    """A table: stage, cached or ran, seconds (stage's own and Prefect's), rows, where it went."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"glyph run --profile {summary['profile']}  ·  store {summary['store']}")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("stage s", justify="right")
    table.add_column("prefect s", justify="right")
    table.add_column("rows in → out", justify="right")
    table.add_column("drops")
    table.add_column("artifact", overflow="fold")
    for row in summary["stages"]:
        drops = ", ".join(f"{k} {v}" for k, v in row["drops"].items() if v) or ""
        table.add_row(
            row["stage"],
            "[green]Cached[/green]" if row["cached"] else "[yellow]ran[/yellow]",
            f"{row['seconds']:.2f}",
            f"{row['stage_seconds']:.2f}",
            f"{row['overhead_seconds']:.2f}",
            f"{row['rows_in']} → {row['rows_out']}",
            drops,
            row["uri"],
        )
    console = Console(width=max(160, Console().width))
    console.print(table)
    cached = sum(r["cached"] for r in summary["stages"])
    console.print(
        f"{cached}/{len(summary['stages'])} stages cached; flow {summary['seconds']:.2f}s "
        f"(stages {sum(r['seconds'] for r in summary['stages']):.2f}s)"
    )


def _api_url(use_server: bool) -> tuple[str | None, str | None]:
    """(API URL to use, UI base URL): the configured one, the on-demand local server's, or
    (None, None) for Prefect's temporary in-process server."""
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        return str(configured), str(configured).rstrip("/").removesuffix("/api")
    if not use_server:
        return None, None
    from glyph_cli.server import ensure_server

    info = ensure_server()
    return info.api_url, info.ui_url


def _flow_run_info(flow_run_id: Any, ui: str | None) -> dict[str, Any]:
    """Id, name and (with a lasting server) the UI address of the flow run just finished."""
    info: dict[str, Any] = {"id": str(flow_run_id) if flow_run_id else None, "name": None}
    if not flow_run_id:
        return info
    if ui:
        info["server"] = ui
        info["ui_url"] = f"{ui}/runs/flow-run/{flow_run_id}"
    try:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            info["name"] = client.read_flow_run(flow_run_id).name
    except Exception:  # the name is a courtesy; the id (and URL) are enough
        pass
    return info


def run_cmd(
    profile: str = typer.Option("tiny", "--profile", "-p", help="tiny | demo | full"),
    store: str | None = typer.Option(
        None, "--store", help="local directory or s3://bucket/prefix (default $GLYPH_STORE or .glyph/store)"
    ),
    set_: list[str] = typer.Option([], "--set", help="override a setting: key.path=value (repeatable)"),
    refresh: list[str] = typer.Option(
        [], "--refresh", help="recompute this stage and every later one (repeatable)"
    ),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON instead of a table"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Prefect logs at WARNING only"),
    server: bool = typer.Option(
        True,
        "--server/--no-server",
        envvar="GLYPH_SERVER",
        help="without PREFECT_API_URL: start/reuse a local Prefect server (UI on :4200), "
        "or use Prefect's temporary in-process one",
    ),
) -> None:
    """Run unify → generate → filter → rewrite → train → evaluate; cached stages return at once."""
    _prefect_defaults(quiet)
    from glyph_core.errors import GlyphError
    from glyph_core.profiles import load_profile, parse_sets

    try:
        overrides = parse_sets(set_)
        load_profile(profile, overrides)  # fail on a typo before Prefect starts a server
    except GlyphError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from glyph_cli.server import ServerError

    try:
        api_url, ui = _api_url(server)
    except ServerError as exc:
        typer.echo(f"error: {exc}\n(or run with --no-server to use Prefect's temporary server)", err=True)
        raise typer.Exit(1) from None

    import logging

    from flows.pipeline import pipeline

    # Prefect gives the extra loggers its handlers but not a level, and the root logger's
    # WARNING would hide the progress lines.
    logging.getLogger("glyph_core").setLevel(logging.WARNING if quiet else logging.INFO)

    updates = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(updates=updates):  # type: ignore[arg-type]
        try:
            state = pipeline(
                profile=profile, store=store, refresh=list(refresh), overrides=overrides, return_state=True
            )
            summary: dict[str, Any] = state.result()  # type: ignore[union-attr]
        except GlyphError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        summary["flow_run"] = _flow_run_info(state.state_details.flow_run_id, ui)  # type: ignore[union-attr]

    from glyph_cli.report import evaluation_block, print_evaluation, save_last

    summary["evaluation"] = evaluation_block(summary["store"], summary["stages"])
    summary["last_run"] = save_last(summary)
    if json_out:
        json.dump(summary, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print_summary(summary)
        print_evaluation(summary)
        typer.echo(f"saved: {summary['last_run']}  (`glyph report` prints this again and writes report.md)")


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
