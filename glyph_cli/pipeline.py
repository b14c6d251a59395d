"""`glyph run`: the whole pipeline with a profile, on a local directory or an object store.

Prefect needs no server started by hand. Without `PREFECT_API_URL`, `glyph run` uses the Prefect
server of this `PREFECT_HOME`, however it was started, or starts one in the background
(glyph_cli/server.py: `prefect server start --background` on 127.0.0.1:4200, SQLite under
`PREFECT_HOME`), so a cached rerun does not pay Prefect's ~11 s temporary-server start-up, and
the person can open the UI and see the same run. `--no-server` (or `GLYPH_SERVER=0`) keeps Prefect's temporary
in-process server instead (what the tests want: nothing left running). We keep Prefect's home
where Prefect users expect it rather than under the store: the store may be an S3 bucket, and
one run history across stores is what a person browsing the UI wants.

The run ends with the stage table, the evaluation table (base vs tuned per bucket), the
headline (selectivity within sources), the plot's path and the flow run's UI address. The flow
itself saves the run's summary in the store for `glyph report` (glyph_cli/run_summary.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import typer

from glyph_cli.common import StoreOpt, fail
from glyph_cli.run_summary import print_evaluation, print_summary
from glyph_cli.server import ServerError, ensure_server
from glyph_core.errors import GlyphError
from glyph_core.profiles import PROFILES, load_profile, parse_sets
from glyph_core.stages import refresh_set


def _prefect_defaults(quiet: bool) -> None:
    """Settings for a fresh machine; each only where the user has not set it (env wins)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _api_url(use_server: bool) -> str | None:
    """The API URL to use: the configured one, this home's local server's (started if need be),
    or None for Prefect's temporary in-process server."""
    from prefect.settings import PREFECT_API_URL  # Prefect: ~1 s to import; `glyph --help` needs none

    configured = PREFECT_API_URL.value()
    if configured:
        return str(configured)
    if not use_server:
        return None
    return ensure_server().api_url


def run_cmd(
    profile: str = typer.Option("tiny", "--profile", "-p", help=" | ".join(PROFILES)),
    store: StoreOpt = None,
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
    """Run every stage (unify → generate → filter → rewrite → train → evaluate) under Prefect; cached stages return at once."""
    _prefect_defaults(quiet)
    try:
        overrides = parse_sets(set_)
        load_profile(profile, overrides)  # fail on a typo before Prefect starts a server
        refresh_set(refresh)
    except GlyphError as exc:
        fail(exc, code=2)
    try:
        api_url = _api_url(server)
    except ServerError as exc:
        fail(f"{exc}\n(or run with --no-server to use Prefect's temporary server)")

    # Imported only now: Prefect and the flow take seconds to import, and `glyph --help` or a
    # typo in `--set` should not wait for them.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline

    # The stages log through `glyph_core.*` loggers (train: "step 5/40 loss ..."); the tasks
    # send them to the run log (tasks/runlog.py); the root logger's WARNING would hide them here.
    logging.getLogger("glyph_core").setLevel(logging.WARNING if quiet else logging.INFO)

    updates = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(updates=updates):  # type: ignore[arg-type]
        try:
            state = pipeline(
                profile=profile, store=store, refresh=list(refresh), overrides=overrides, return_state=True
            )
            summary: dict[str, Any] = state.result()  # type: ignore[union-attr]
        except GlyphError as exc:
            fail(exc)

    if json_out:
        json.dump(summary, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print_summary(summary)
        print_evaluation(summary)
        name = (summary.get("flow_run") or {}).get("name") or ""
        typer.echo(f"`glyph report {name}` prints this again and writes report.md with the plot")


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
