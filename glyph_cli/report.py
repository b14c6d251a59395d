"""`glyph report [RUN]`: a pipeline run's tables again, and `report.md` with the plot.

Any run: the newest in the store, or one named by flow run id or name, whether `glyph run` or
the Prefect UI started it (glyph_cli/run_summary.py finds its summary in the store, or through
the Prefect API and the store named in the run's parameters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from glyph_cli.common import StoreOpt, reported_errors
from glyph_cli.run_summary import (
    evaluation_block,
    load_summary,
    open_store,
    print_evaluation,
    print_summary,
    report_markdown,
)
from glyph_cli.sweep import show_sweep
from glyph_core.reports import summary_uri
from glyph_core.storage import StorageError


def write_report(summary: dict[str, Any], out: Path) -> Path:
    """Write the Markdown report to `out`, with the plot copied beside it so the link works
    offline and for S3 stores alike."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_ref = None
    ev = evaluation_block(summary)
    if ev:
        try:
            data = open_store(summary["store"]).read_bytes(ev["plot"])
        except StorageError:
            data = b""
        if data:
            plot = out.with_name(out.stem + "_emergence_accuracy.png")
            plot.write_bytes(data)
            plot_ref = plot.name
    out.write_text(report_markdown(summary, plot_ref))
    return out


def report_cmd(
    run: str | None = typer.Argument(
        None, help="flow run id or name (default: the newest run in the store)", show_default=False
    ),
    store: StoreOpt = None,
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Markdown file to write (default report.md beside the run's summary; ./report.md for S3); "
        "with --sweep, a folder for the sweep's table, plot, record and metrics",
    ),
    sweep: str | None = typer.Option(
        None, "--sweep", help="show a sweep instead: its flow-run id or name, `last`, or a kept folder"
    ),
) -> None:
    """Print a run's tables again and write a short Markdown report with the plot."""
    if sweep is not None:
        with reported_errors():
            show_sweep(sweep, store, out)
        return
    with reported_errors():
        summary, uri = load_summary(store, run)
    print_summary(summary)
    print_evaluation(summary)
    if out is None:  # beside the run's own summary, or here for an object store
        run_id = (summary.get("flow_run") or {}).get("id")
        own = summary_uri(open_store(summary["store"]), run_id) if run_id else uri
        out = Path(own).with_name("report.md") if "://" not in own else Path("report.md")
    path = write_report(summary, out)
    typer.echo(f"report: {path}")


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
