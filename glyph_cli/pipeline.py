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
`{store}/_runs/last.json` for `glyph report` (glyph_cli/run_summary.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import typer

from glyph_cli.common import StoreOpt, fail
from glyph_cli.run_summary import evaluation_block, print_evaluation, print_summary, save_last
from glyph_cli.server import ServerError, ensure_server
from glyph_core.errors import GlyphError
from glyph_core.profiles import PROFILES, load_profile, parse_sets


def prefect_defaults(quiet: bool) -> None:
    """Settings for a fresh machine; each only where the user has not set it (env wins)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The stages log through `glyph_core.*` loggers (train: "step 5/40 loss ..."; evaluate: each
    # model's generation); Prefect shows them in the terminal and in the UI's run logs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "glyph_core")
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def api_url_for(use_server: bool) -> tuple[str | None, str | None]:
    """(API URL to use, UI base URL): the configured one, the on-demand local server's, or
    (None, None) for Prefect's temporary in-process server."""
    from prefect.settings import PREFECT_API_URL  # Prefect: ~1 s to import; `glyph --help` needs none

    configured = PREFECT_API_URL.value()
    if configured:
        return str(configured), str(configured).rstrip("/").removesuffix("/api")
    if not use_server:
        return None, None
    info = ensure_server()
    return info.api_url, info.ui_url


def flow_run_info(flow_run_id: Any, ui: str | None) -> dict[str, Any]:
    """Id, name and (with a lasting server) the UI address of the flow run just finished."""
    info: dict[str, Any] = {"id": str(flow_run_id) if flow_run_id else None, "name": None}
    if not flow_run_id:
        return info
    if ui:
        info["server"] = ui
        info["ui_url"] = f"{ui}/runs/flow-run/{flow_run_id}"
    from prefect import get_client  # see api_url_for

    try:
        with get_client(sync_client=True) as client:
            info["name"] = client.read_flow_run(flow_run_id).name
    except Exception:  # the name is a courtesy; the id (and URL) are enough
        pass
    return info


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
    prefect_defaults(quiet)
    try:
        overrides = parse_sets(set_)
        load_profile(profile, overrides)  # fail on a typo before Prefect starts a server
    except GlyphError as exc:
        fail(exc, code=2)
    try:
        api_url, ui = api_url_for(server)
    except ServerError as exc:
        fail(f"{exc}\n(or run with --no-server to use Prefect's temporary server)")

    # Imported only now: Prefect and the flow take seconds to import, and `glyph --help` or a
    # typo in `--set` should not wait for them.
    from prefect.settings import PREFECT_API_URL, temporary_settings

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
            fail(exc)
        summary["flow_run"] = flow_run_info(state.state_details.flow_run_id, ui)  # type: ignore[union-attr]

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
