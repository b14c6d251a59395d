"""What a pipeline run leaves for people: its summary saved as `{store}/_runs/last.json`, and
the tables and Markdown drawn from it. `glyph run` writes and prints it; `glyph report` reads it
back and prints it again, so neither command needs the other.

The summary is published atomically (a crash mid-write never leaves half a file) together with
what the evaluation produced: the side-by-side rows, selectivity, the Markdown table and where
the plot and metrics are. Reading it back needs neither Prefect nor a model, and works on any
store (a local directory or S3).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from glyph_core.errors import GlyphError
from glyph_core.eval_report import display_rows, markdown_table
from glyph_core.profiles import default_store_root
from glyph_core.storage import StorageError, Store

LAST_RUN = ("_runs", "last.json")


def open_store(store: str | None) -> Store:
    return Store(store or default_store_root())


def evaluation_block(store_root: str, stages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the run's evaluate stage produced, read back from its artifacts (None if absent)."""
    row = next((r for r in stages if r["stage"] == "evaluate"), None)
    if row is None:
        return None
    st = open_store(store_root)
    key = row["key"]
    table_uri = row.get("refs", {}).get("table") or st.uri("evaluate", key, "table.parquet")
    metrics_uri = st.uri("evaluate", key, "metrics.json")
    try:
        table = pq.read_table(io.BytesIO(st.read_bytes(table_uri)))
        metrics = json.loads(st.read_bytes(metrics_uri))
    except (StorageError, OSError, ValueError):
        return None
    models = metrics.get("models", {})
    return {
        "rows": display_rows(table),
        "table_md": markdown_table(table),
        "selectivity": {m: v.get("selectivity", {}) for m, v in models.items()},
        "tuned_minus_base": metrics.get("tuned_minus_base", {}),
        "n_problems": metrics.get("n_problems"),
        "plot": st.uri("evaluate", key, "emergence_accuracy.png"),
        "metrics": metrics_uri,
        "table": table_uri,
    }


def save_last(summary: dict[str, Any]) -> str:
    """Publish the summary as `{store}/_runs/last.json`; returns its URI."""
    st = open_store(summary["store"])
    uri = st.uri(*LAST_RUN)
    st.publish_bytes(uri, json.dumps(summary, indent=2, default=str).encode())
    return str(uri)


def load_last(store: str | None) -> tuple[dict[str, Any], str]:
    st = open_store(store)
    uri = st.uri(*LAST_RUN)
    try:
        return json.loads(st.read_bytes(uri)), uri
    except StorageError:
        raise GlyphError(f"no run recorded in {st.root} yet ({uri}); run `glyph run` first") from None


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


def _rate(p: float | None, lo: float | None, hi: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return f"{100 * p:.0f}% [{100 * (lo or 0):.0f}–{100 * (hi or 0):.0f}]"


def _num(x: float | None, fmt: str = "{:+.2f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return fmt.format(x)


def print_evaluation(summary: dict[str, Any], console: Any = None) -> None:
    """The evaluation table (base vs tuned per bucket), selectivity, the plot's path, the UI."""
    console = console or Console(width=max(120, Console().width))
    ev = summary.get("evaluation")
    if not ev:
        console.print("[yellow]No evaluation results in this run.[/yellow]")
    else:
        table = Table(
            title=f"Promptless evaluation on {ev.get('n_problems', '?')} held-out problems "
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
            table.add_row(
                r["group"],
                r["model"],
                str(r["n"]),
                _rate(r["emergence"], r["emergence_lo"], r["emergence_hi"]),
                _rate(r["valid"], r["valid_lo"], r["valid_hi"]),
                _rate(r["accuracy"], r["accuracy_lo"], r["accuracy_hi"]),
                _num(r["mean_tokens"], "{:.0f}"),
            )
        console.print(table)
        for model, sel in ev.get("selectivity", {}).items():
            console.print(
                f"selectivity, {model}: emergence hard − easy {_num(sel.get('emergence_hard_minus_easy'))}, "
                f"AUROC(glyph use ~ difficulty) {_num(sel.get('auroc_glyph_vs_difficulty'), '{:.2f}')}, "
                f"AUROC(valid ~ difficulty) {_num(sel.get('valid_auroc_vs_difficulty'), '{:.2f}')}"
            )
        console.print(f"plot:    {ev['plot']}")
        console.print(f"metrics: {ev['metrics']}")
    flow_run = summary.get("flow_run") or {}
    if flow_run.get("ui_url"):
        console.print(
            f"Prefect UI: {flow_run['ui_url']}  (flow run [bold]{flow_run.get('name')}[/bold], "
            f"id {flow_run.get('id')}; all runs: {flow_run.get('server', '')}/runs)"
        )
    elif flow_run.get("id"):
        console.print(
            f"flow run {flow_run.get('name')} ({flow_run.get('id')}) ran on Prefect's temporary server; "
            "run without --no-server to keep a UI (`glyph server start`)."
        )


# ---------------------------------------------------------------------------------------------
# Markdown


def markdown_report(summary: dict[str, Any], plot_ref: str | None) -> str:
    """A short report: what ran, the stage table, the evaluation table, selectivity, the plot."""
    lines = [f"# glyph run — profile `{summary['profile']}`", ""]
    lines.append(f"Store: `{summary['store']}` · flow {summary['seconds']:.1f} s")
    flow_run = summary.get("flow_run") or {}
    if flow_run.get("id"):
        where = f" ({flow_run['ui_url']})" if flow_run.get("ui_url") else ""
        lines.append(f"Prefect flow run `{flow_run.get('name')}` `{flow_run['id']}`{where}")
    lines += [
        "",
        "## Stages",
        "",
        "| stage | status | seconds | rows in → out | artifact |",
        "|---|---|---:|---:|---|",
    ]
    for r in summary["stages"]:
        status = "Cached" if r["cached"] else "ran"
        lines.append(
            f"| {r['stage']} | {status} | {r['seconds']:.1f} | {r['rows_in']} → {r['rows_out']} | `{r['uri']}` |"
        )
    ev = summary.get("evaluation")
    if ev:
        lines += [
            "",
            "## Evaluation (base vs tuned, held-out problems, latent prompt)",
            "",
            "Rates with 95% Wilson intervals.",
            "",
            ev["table_md"].rstrip(),
            "",
            "Selectivity:",
            "",
        ]
        for model, sel in ev.get("selectivity", {}).items():
            lines.append(
                f"- {model}: emergence hard − easy {_num(sel.get('emergence_hard_minus_easy'))}, "
                f"AUROC of glyph use vs difficulty {_num(sel.get('auroc_glyph_vs_difficulty'), '{:.2f}')}"
            )
        if plot_ref:
            lines += ["", f"![Glyph emergence and accuracy by bucket]({plot_ref})"]
        lines += ["", f"Metrics: `{ev['metrics']}`"]
    return "\n".join(lines) + "\n"
