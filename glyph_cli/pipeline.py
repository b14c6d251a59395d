"""`glyph run`: the whole pipeline with a profile, on a local directory or an object store.

Prefect needs no server started by hand: without `PREFECT_API_URL` it starts a temporary
local server for the run (SQLite under `PREFECT_HOME`, `~/.prefect` by default, so `prefect
server start` later shows the run history). We keep Prefect's home where Prefect users expect
it rather than under the store: the store may be an S3 bucket, and one run history across
stores is what a person browsing the UI wants. On a slow 2-core machine that temporary server
can take more than Prefect's default 20 s to start, so the start-up timeout is raised unless
the user set it.
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

    from flows.pipeline import pipeline

    try:
        summary = pipeline(profile=profile, store=store, refresh=list(refresh), overrides=overrides)
    except GlyphError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if json_out:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_summary(summary)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
