"""What a pipeline run leaves for people, read back for the terminal and for `report.md`.

The pipeline flow saves each run's summary in its store (`{store}/_runs/{flow run id}/summary.json`
and the newest as `_runs/last.json`; glyph_core/reports.py), whether `glyph run` started it or
the Prefect UI did. `load_summary` finds a run by flow run id or name: in the store first, then
through the Prefect API (the run's `store` parameter names the store). The evaluation is read
from what the evaluate stage wrote (`metrics.json`, `table.parquet`, the plot) and rendered by
glyph_core/eval_report.py, the same functions the UI's `glyph-evaluation` artifact uses.
Reading a summary back needs neither a model nor, when the store has it, Prefect.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from glyph_core.errors import GlyphError
from glyph_core.eval_report import display_rows, fmt_rate, headline_lines, markdown_report
from glyph_core.profiles import default_store_root
from glyph_core.reports import RUNS_DIR, SUMMARY_NAME, stages_table, summary_uri
from glyph_core.storage import StorageError, Store

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


def open_store(store: str | None) -> Store:
    return Store(store or default_store_root())


def _read(st: Store, uri: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(st.read_bytes(uri)))
    except StorageError:
        return None


def _by_name(st: Store, name: str) -> tuple[dict[str, Any], str] | None:
    """The newest summary in the store of the flow run named `name`."""
    try:
        found = st.fs.glob(st.uri(RUNS_DIR, "*", SUMMARY_NAME))
    except (OSError, ValueError):
        return None
    best: tuple[dict[str, Any], str] | None = None
    for path in found:
        uri = path if "://" not in st.root else f"{st.root.split('://', 1)[0]}://{path}"
        summary = _read(st, uri)
        if not summary or (summary.get("flow_run") or {}).get("name") != name:
            continue
        if best is None or str(summary.get("finished", "")) > str(best[0].get("finished", "")):
            best = (summary, uri)
    return best


def flow_run_of(run: str) -> Any:
    """The flow run with this id or name, through the Prefect API."""
    from uuid import UUID as AsUUID

    from prefect import get_client  # ~1 s to import: only when the store does not have the run
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    try:
        with get_client(sync_client=True) as client:
            if UUID.match(run):
                return client.read_flow_run(AsUUID(run))
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run])), limit=2
            )
    except Exception as exc:  # not found, or no API: one line
        raise GlyphError(
            f"flow run {run!r} not found in the store or through the Prefect API ({exc})"
        ) from None
    if not runs:
        raise GlyphError(f"no flow run named {run!r} in the store or through the Prefect API")
    return runs[0]


def load_summary(store: str | None, run: str | None = None) -> tuple[dict[str, Any], str]:
    """A run's summary and where it was read: the newest run (`run` None), or the flow run with
    that id or name, from the store (`--store` or the default) or through the Prefect API."""
    st = open_store(store)
    if run is None:
        uri = summary_uri(st)
        summary = _read(st, uri)
        if summary is None:
            raise GlyphError(
                f"no run recorded in {st.root} yet ({uri}); run `glyph run`, or name a flow run: "
                "`glyph report <id or name>`"
            )
        return summary, uri
    if UUID.match(run) and (summary := _read(st, summary_uri(st, run))) is not None:
        return summary, summary_uri(st, run)
    if not UUID.match(run) and (found := _by_name(st, run)) is not None:
        return found
    flow_run = flow_run_of(run)
    run_store = open_store(store or (flow_run.parameters or {}).get("store"))
    uri = summary_uri(run_store, str(flow_run.id))
    summary = _read(run_store, uri)
    if summary is None:
        state = flow_run.state.name if flow_run.state else "unknown"
        raise GlyphError(
            f"flow run {flow_run.name} ({flow_run.id}, {state}) left no summary at {uri}: it has not "
            "finished, or its store is elsewhere (--store)"
        )
    return summary, uri


def evaluation_block(summary: dict[str, Any]) -> dict[str, Any] | None:
    """What the run's evaluate stage produced, read back from the store (None if absent)."""
    row = next((r for r in summary["stages"] if r["stage"] == "evaluate"), None)
    if row is None:
        return None
    st = open_store(summary["store"])
    key = row["key"]
    table_uri = row.get("refs", {}).get("table") or st.uri("evaluate", key, "table.parquet")
    metrics_uri = st.uri("evaluate", key, "metrics.json")
    try:
        table = pq.read_table(io.BytesIO(st.read_bytes(table_uri)))
        metrics = json.loads(st.read_bytes(metrics_uri))
    except (StorageError, OSError, ValueError):
        return None
    return {
        "rows": display_rows(table),
        "metrics": metrics,
        "plot": st.uri("evaluate", key, "emergence_accuracy.png"),
        "metrics_uri": metrics_uri,
    }


# ---------------------------------------------------------------------------------------------
# terminal


def print_summary(summary: dict[str, Any]) -> None:
    """A table: stage, cached or ran, seconds (stage's own and Prefect's), rows, where it went."""
    table = Table(title=f"glyph run --profile {summary['profile']}  ·  store {summary['store']}")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("stage s", justify="right")
    table.add_column("prefect s", justify="right")
    table.add_column("rows in → out", justify="right")
    table.add_column("errors", justify="right")
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
            str(row.get("errors", 0)),  # summaries saved before error counts have none
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


def print_evaluation(summary: dict[str, Any], console: Any = None) -> None:
    """The evaluation table (base vs tuned per bucket), the headline, the plot's path, the UI."""
    console = console or Console(width=max(120, Console().width))
    ev = evaluation_block(summary)
    if not ev:
        console.print("[yellow]No evaluation results in this run.[/yellow]")
    else:
        table = Table(
            title=f"Promptless evaluation on {ev['metrics'].get('n_problems', '?')} held-out problems "
            "(latent prompt, greedy; 95% Wilson intervals)"
        )
        for col, just in (
            ("bucket", "left"),
            ("model", "left"),
            ("n", "right"),
            ("glyph emergence", "right"),
            ("valid structure", "right"),
            ("accuracy", "right"),
            ("mean tokens", "right"),
        ):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        previous = None
        for r in ev["rows"]:
            if previous is not None and r["group"] != previous:
                table.add_section()
            previous = r["group"]
            tokens = r["mean_tokens"]
            table.add_row(
                r["group"],
                r["model"],
                str(r["n"]),
                *(fmt_rate(r[k], r[f"{k}_lo"], r[f"{k}_hi"]) for k in ("emergence", "valid", "accuracy")),
                "–" if tokens is None or tokens != tokens else f"{tokens:.0f}",
            )
        console.print(table)
        for line in headline_lines(ev["metrics"]):
            console.print(line, highlight=False, markup=False)
        console.print(f"plot:    {ev['plot']}")
        console.print(f"metrics: {ev['metrics_uri']}")
    flow_run = summary.get("flow_run") or {}
    if flow_run.get("ui_url"):
        console.print(
            f"Prefect UI: {flow_run['ui_url']}  (flow run [bold]{flow_run.get('name')}[/bold]; "
            "artifact glyph-evaluation has the report with the plot)"
        )
    elif flow_run.get("id"):
        console.print(
            f"flow run {flow_run.get('name')} ({flow_run.get('id')}) ran on Prefect's temporary server; "
            "run without --no-server to keep a UI (`glyph server start`)."
        )


# ---------------------------------------------------------------------------------------------
# Markdown


def report_markdown(summary: dict[str, Any], plot_ref: str | None) -> str:
    """`report.md`: what ran, the stage table, then the evaluation report (eval_report's) and the plot."""
    lines = [f"# glyph run — profile `{summary['profile']}`", ""]
    lines.append(f"Store: `{summary['store']}` · flow {summary['seconds']:.1f} s")
    flow_run = summary.get("flow_run") or {}
    if flow_run.get("id"):
        where = f" ({flow_run['ui_url']})" if flow_run.get("ui_url") else ""
        lines.append(f"Prefect flow run `{flow_run.get('name')}` `{flow_run['id']}`{where}")
    lines += ["", "## Stages", "", *stages_table(summary["stages"])]
    ev = evaluation_block(summary)
    if ev:
        lines += [""]
        if plot_ref:
            lines += [f"![Glyph emergence and accuracy by bucket]({plot_ref})", ""]
        lines += [
            markdown_report(ev["metrics"], original_study=True).rstrip(),
            "",
            f"Metrics: `{ev['metrics_uri']}`",
        ]
    return "\n".join(lines) + "\n"
