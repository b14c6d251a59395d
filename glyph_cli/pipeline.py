"""`glyph run`: the whole pipeline with a profile, on a local directory or an object store.

Prefect needs no server started by hand. Without `PREFECT_API_URL`, `glyph run` uses the Prefect
server of this `PREFECT_HOME`, however it was started, or starts one in the background
(glyph_cli/server.py: `prefect server start --background` on 127.0.0.1:4200, SQLite under
`PREFECT_HOME`), so a cached rerun does not pay Prefect's ~11 s temporary-server start-up, and
the person can open the UI and see the same run. `--no-server` (or `GLYPH_SERVER=0`) keeps Prefect's temporary
in-process server instead (what the tests want: nothing left running). We keep Prefect's home
where Prefect users expect it rather than under the store: the store may be an S3 bucket, and
one run history across stores is what a person browsing the UI wants.

The run ends with the stage table (errors per stage included), the evaluation table (base vs
tuned per bucket), the headline (selectivity within sources), the plot's path and the flow run's
UI address. The flow itself saves the run's summary in the store for `glyph report`
(glyph_cli/run_summary.py).

A failure ends with one `error:` line (glyph_cli/common.py), and everything that can be checked
before Prefect starts is: the settings and refresh names, then the store. In the terminal each
of Prefect's log records is one line (the traceback stays in the UI's run logs; `--debug`
shows it), `-q` leaves only the summary or the error line, and every Prefect API call is
bounded (`API_LIMITS`). docs/failures.md has the whole picture.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import warnings
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
from glyph_cli.deploy import REPO, load_automations
from glyph_cli.run_summary import print_evaluation, print_summary
from glyph_cli.server import ServerError, ensure_server
from glyph_core.profiles import PROFILES, default_store_root, parse_sets, validate_run
from glyph_core.storage import Store

ZOMBIE_AUTOMATION = "glyph-crash-zombie-runs"
AUTOMATIONS_FILE = REPO / "deployments" / "automations.yaml"

# Bounds on every call to the Prefect API (Prefect's defaults: 60 s per request, 5 retries with
# 2, 4, 8, 16, 32 s of back-off, so about 7 minutes for one call to a server that stopped
# answering). Here: 30 s per request and 3 retries (2 + 4 + 8 s): a server that died fails a
# call in about 15 s, one that accepts connections and never answers in about 2 minutes.
API_LIMITS = {"PREFECT_API_REQUEST_TIMEOUT": "30", "PREFECT_CLIENT_MAX_RETRIES": "3"}

QUIET_LIBRARIES = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # TRL's tokenizing bars
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",  # library deprecation notices, here and in launched trainers
}
"""What `-q` also turns off: the libraries' own progress bars and notices (env wins)."""


def prefect_defaults(quiet: bool = False) -> None:
    """Settings for a fresh machine; each only where the user has not set it (env wins)."""
    for name, value in {**API_LIMITS, **(QUIET_LIBRARIES if quiet else {})}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


class _WithoutTraceback(logging.Formatter):
    """A console format, minus the traceback: in the terminal every log record is one line, and
    the failure's own `error:` line says what to do. The record itself is not changed, so the
    API handler still sends the traceback to the run's logs in the UI."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = copy.copy(record)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return self.inner.format(record)


def terminal_logs(debug: bool, quiet: bool) -> None:
    """What reaches the terminal from Prefect's log handlers (the console handler, and the one of
    its internal services): with `-q` nothing (the run's logs stay in the UI; the command prints
    its summary or its error line), by default one line per record, with `--debug` the
    tracebacks too. Outside `--debug`, a log record that cannot be delivered (the API is down)
    is dropped without the stdlib's "--- Logging error ---" report."""
    from prefect.logging.handlers import APILogHandler  # imported with Prefect; see run_cmd

    if quiet:
        warnings.simplefilter("ignore")
    if not debug:
        logging.raiseExceptions = False
    for logger in (logging.getLogger(), logging.getLogger("prefect._internal")):
        for handler in logger.handlers:
            if not isinstance(handler, logging.StreamHandler) or isinstance(handler, APILogHandler):
                continue
            if quiet:
                handler.setLevel(logging.CRITICAL + 1)
            if not debug and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter))


def ensure_zombie_automation() -> bool:
    """Create, once, the automation that marks Crashed a glyph flow run whose heartbeats stopped
    (`ZOMBIE_AUTOMATION` in deployments/automations.yaml) on the local server `glyph run` uses;
    True if it was created now.

    A run whose process or server died mid-run stays Running in Prefect's database, since nobody
    is left to report its end. Every flow run sends a heartbeat event (every 180 s by default in
    Prefect 3.9); with this automation the server marks the run Crashed once they have stopped
    for 10 minutes. `glyph deploy` creates it with the deployments' automations on a shared
    server; the local one `glyph run` starts gets it here (one query per run). Best effort: a
    server without automations runs the pipeline all the same.
    """
    from prefect import get_client

    try:
        (automation,) = [a for a in load_automations(AUTOMATIONS_FILE) if a.name == ZOMBIE_AUTOMATION]
        with get_client(sync_client=True) as client:
            if client.read_automations_by_name(ZOMBIE_AUTOMATION):
                return False
            client.create_automation(automation)
        return True
    except Exception as exc:  # the run does not depend on it
        logging.getLogger("glyph_core").warning(
            "could not create the %s automation: %s", ZOMBIE_AUTOMATION, exc
        )
        return False


def api_url_for(use_server: bool) -> tuple[str | None, bool]:
    """(API URL to use, whether it is this home's local server): the configured one, the local
    server's (started if need be), or (None, False) for Prefect's temporary in-process server."""
    from prefect.settings import PREFECT_API_URL  # Prefect: ~1 s to import; `glyph --help` needs none

    configured = PREFECT_API_URL.value()
    if configured:
        return str(configured), False
    if not use_server:
        return None, False
    return ensure_server().api_url, True


def run_cmd(
    profile: str = typer.Option("tiny", "--profile", "-p", help=" | ".join(PROFILES)),
    store: StoreOpt = None,
    set_: list[str] = typer.Option([], "--set", help="override a setting: key.path=value (repeatable)"),
    refresh: list[str] = typer.Option(
        [], "--refresh", help="recompute this stage and every later one (repeatable; `all`)"
    ),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON instead of a table"),
    quiet: QuietOpt = False,
    server: ServerOpt = True,
    debug: DebugOpt = False,
) -> None:
    """Run every stage (unify → generate → filter → rewrite → train → evaluate) under Prefect; cached stages return at once."""
    set_debug(debug)
    prefect_defaults(quiet)
    # Everything that can be checked before Prefect starts a server is checked here: the
    # settings and refresh names (the same function the flow calls at its first line), then
    # the store (a bad path, a dead or silent endpoint fail within its time limits).
    with reported_errors(code=2):
        overrides = parse_sets(set_)
        validate_run(profile, overrides, refresh)
    with reported_errors():
        Store(store or default_store_root()).ensure()
    try:
        api_url, own_server = api_url_for(server)
    except ServerError as exc:
        fail(f"{exc}; or run with --no-server to use Prefect's temporary server")

    # Imported only now: Prefect and the flow take seconds to import, and `glyph --help` or a
    # typo in `--set` should not wait for them.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline

    terminal_logs(debug=debug_enabled(), quiet=quiet)
    # Prefect gives the extra loggers its handlers but not a level, and the root logger's
    # WARNING would hide the progress lines (in the terminal and in the UI's run logs).
    logging.getLogger("glyph_core").setLevel(logging.INFO)

    updates = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(updates=updates), reported_errors():  # type: ignore[arg-type]
        if own_server:
            ensure_zombie_automation()
        state = pipeline(
            profile=profile, store=store, refresh=list(refresh), overrides=overrides, return_state=True
        )
        summary: dict[str, Any] = state.result()  # type: ignore[union-attr]

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
