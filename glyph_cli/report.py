"""`glyph report`: the last run's tables again, and a short Markdown report with the plot
(the summary `glyph run` saved; glyph_cli/run_summary.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from glyph_cli.common import StoreOpt, fail
from glyph_cli.run_summary import load_last, markdown_report, open_store, print_evaluation, print_summary
from glyph_cli.sweep import show_sweep
from glyph_core.errors import GlyphError
from glyph_core.storage import StorageError


def write_report(summary: dict[str, Any], out: Path) -> Path:
    """Write the Markdown report to `out`, with the plot copied beside it so the link works
    offline and for S3 stores alike."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_ref = None
    ev = summary.get("evaluation")
    if ev and ev.get("plot"):
        try:
            data = open_store(summary["store"]).read_bytes(ev["plot"])
        except StorageError:
            data = b""
        if data:
            plot = out.with_name(out.stem + "_emergence_accuracy.png")
            plot.write_bytes(data)
            plot_ref = plot.name
    out.write_text(markdown_report(summary, plot_ref))
    return out


def report_cmd(
    store: StoreOpt = None,
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Markdown file to write (default report.md beside last.json; ./report.md for S3); "
        "with --sweep, a folder for the sweep's table, plot, record and metrics",
    ),
    sweep: str | None = typer.Option(
        None, "--sweep", help="show a sweep instead: its flow-run id or name, `last`, or a kept folder"
    ),
) -> None:
    """Print the last run's tables again and write a short Markdown report with the plot."""
    if sweep is not None:
        try:
            show_sweep(sweep, store, out)
        except GlyphError as exc:
            fail(exc)
        return
    try:
        summary, uri = load_last(store)
    except GlyphError as exc:
        fail(exc)
    print_summary(summary)
    print_evaluation(summary)
    if out is None:
        out = Path(uri).with_name("report.md") if "://" not in uri else Path("report.md")
    path = write_report(summary, out)
    typer.echo(f"report: {path}")


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
