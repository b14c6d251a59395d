"""What a finished stage or pipeline run shows a person, rendered without Prefect (docs/ui.md).

The Prefect side (`tasks/artifacts.py`) publishes these as artifacts and log lines; `glyph
report` reads the same renderings. Rendering lives here so that the UI, the terminal and the
tests show one thing, computed from what the stage left in the store:

- `stage_markdown`: the stage's own artifact (`glyph-<stage>`): counts, drops, every output
  with its path as text (a browser cannot open a worker's `file://` path) and the stage's
  report section;
- a stage declared with a `report` (glyph_core/stages.py) adds a `StageReport`:
  `evaluation_report` (the `glyph-evaluation` document: `eval_report.markdown_report` with the
  plot embedded as a `data:` URL, and `eval_report.headline_lines` for the log) and
  `training_report` (the `glyph-train-metrics` table, a loss curve, a loss line for the log).

Each pipeline run also leaves its summary in the store, `{store}/_runs/{flow run id}/summary.json`
(and the newest as `_runs/last.json`), so `glyph report` finds any run, however it was started.

Images are embedded as `data:image/png;base64,…`, which Prefect's UI renders in a markdown
artifact; a 110-dpi plot is 30–45 KB, far below what the API accepts.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from glyph_core.errors import StorageError
from glyph_core.eval_report import headline_lines, markdown_report, plot_png
from glyph_core.outputs import StageOutput
from glyph_core.storage import DatasetRef, Store
from glyph_core.trainer import summarize_metrics

PLOT_DPI = 110
RUNS_DIR = "_runs"
SUMMARY_NAME = "summary.json"
LAST_NAME = "last.json"


@dataclass(frozen=True)
class Document:
    """One keyed artifact of a stage's report: Markdown or a table (`key` without `glyph-`)."""

    key: str
    description: str
    markdown: str | None = None
    table: list[dict[str, Any]] | None = None


@dataclass
class StageReport:
    """A stage's result for people: log lines, a section of its own artifact, keyed documents."""

    headline: list[str] = field(default_factory=list)
    """A few plain lines for the run log (the result at a glance)."""
    markdown: str = ""
    """Appended to the stage's artifact (`glyph-<stage>`)."""
    documents: list[Document] = field(default_factory=list)


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image(alt: str, png: bytes) -> str:
    """A Markdown image with the PNG inline, so it needs no file a browser could not reach."""
    return f"![{alt}]({png_data_url(png)})"


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def stage_markdown(out: StageOutput, *, cached: bool, report: StageReport | None = None) -> str:
    """The stage's own artifact: how it ended, its counts and drops, its outputs (paths as text)."""
    s = out.stats
    status = "Cached: the result of an earlier run, not recomputed" if cached else f"ran in {s.seconds:.1f} s"
    lines = [
        f"### {out.stage}: {status}",
        "",
        f"Key `{out.key}` · rows {s.rows_in} → {s.rows_out} · errors {s.errors}",
    ]
    drops = {k: v for k, v in s.drops.items() if v}
    if drops:
        lines += ["", "Dropped: " + ", ".join(f"{k} {v}" for k, v in drops.items())]
    lines += ["", "| output | path | sha256 | rows or kind |", "|---|---|---|---|"]
    for name, ref in out.refs.items():
        size = ref.rows if isinstance(ref, DatasetRef) else ref.kind
        lines.append(f"| {name} | `{ref.uri}` | `{ref.sha256[:16]}` | {size} |")
    scalars = {k: v for k, v in s.extra.items() if isinstance(v, int | float | str | bool)}
    if scalars:
        lines += ["", "| detail | value |", "|---|---|"]
        lines += [f"| {k} | `{_scalar(v)}` |" for k, v in scalars.items()]
    if report is not None and report.markdown:
        lines += ["", report.markdown.rstrip()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# evaluate


def load_metrics(store: Store, out: StageOutput) -> dict[str, Any]:
    """The evaluate stage's metrics JSON (its URI is in the stage's stats)."""
    uri = str(out.stats.extra.get("metrics") or store.uri("evaluate", out.key, "metrics.json"))
    return dict(store.read_json(uri))


def evaluation_plot(store: Store, out: StageOutput, metrics: dict[str, Any]) -> bytes:
    """The plot the stage published (`plot_png(metrics)`), drawn again if it is gone."""
    uri = out.stats.extra.get("plot")
    if uri:
        try:
            return store.read_bytes(str(uri))
        except StorageError:
            pass
    return plot_png(metrics)


def evaluation_markdown(metrics: dict[str, Any], png: bytes, paths: dict[str, str] | None = None) -> str:
    """The `glyph-evaluation` document: the plot, then `eval_report.markdown_report`."""
    lines = [
        image("Glyph emergence and accuracy by difficulty bucket; glyph use by MATH level", png),
        "",
        markdown_report(metrics, original_study=True).rstrip(),
    ]
    if paths:
        lines += ["", "Files: " + " · ".join(f"{k} `{v}`" for k, v in paths.items())]
    return "\n".join(lines) + "\n"


def evaluation_report(store: Store, out: StageOutput) -> StageReport:
    """The evaluation as a person reads it: the headline in the log, the whole report with the
    plot as the keyed document `glyph-evaluation` (its history: one entry per run)."""
    metrics = load_metrics(store, out)
    png = evaluation_plot(store, out, metrics)
    paths = {k: str(out.stats.extra[k]) for k in ("metrics", "plot") if out.stats.extra.get(k)}
    headline = headline_lines(metrics)
    return StageReport(
        headline=headline,
        markdown="The whole report with the plot: artifact `glyph-evaluation`.\n\n"
        + "\n".join(f"- {line}" for line in headline),
        documents=[
            Document(
                key="evaluation",
                description=f"Promptless evaluation, base vs tuned, {metrics.get('n_problems', '?')} "
                f"held-out problems (evaluate key {out.key})",
                markdown=evaluation_markdown(metrics, png, paths),
            )
        ],
    )


# ---------------------------------------------------------------------------------------------
# train


TRAIN_COLUMNS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "mean_token_accuracy", "tokens_per_s")


def _clean(value: Any) -> Any:
    """JSON has no NaN: a missing measurement is null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def training_metrics(store: Store, out: StageOutput) -> pa.Table | None:
    """The train stage's logged metrics (hash-checked), or None where it published none."""
    ref = out.refs.get("metrics")
    return store.read_table(ref) if isinstance(ref, DatasetRef) else None


def loss_curve_png(rows: list[dict[str, Any]]) -> bytes:
    """Training loss against optimizer step (and the learning rate on a second axis)."""
    import matplotlib  # seconds to import: only when a train report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(steps, [r["loss"] for r in rows], marker="o", markersize=3, label="loss")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    lr = [r.get("learning_rate") for r in rows]
    if any(v is not None for v in lr):
        ax2 = ax.twinx()
        ax2.plot(steps, [math.nan if v is None else v for v in lr], color="tab:gray", linewidth=1)
        ax2.set_ylabel("learning rate", color="tab:gray")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    plt.close(fig)
    return buf.getvalue()


def training_summary(metrics: pa.Table) -> str:
    """Steps, first and last loss and tokens/s, as the trainer counts them (`summarize_metrics`)."""
    s = summarize_metrics(metrics)
    if not s["steps"]:
        return "no logged training step"
    speed = f", {s['tokens_per_s']:.0f} tokens/s" if s.get("tokens_per_s") else ""
    return f"{s['steps']} steps, loss {s['first_loss']:.4f} → {s['final_loss']:.4f}{speed}"


def training_report(store: Store, out: StageOutput) -> StageReport:
    """The loss curve in the stage's artifact and the logged metrics as `glyph-train-metrics`."""
    metrics = training_metrics(store, out)
    rows = [] if metrics is None else [{k: _clean(v) for k, v in r.items()} for r in metrics.to_pylist()]
    summary = training_summary(metrics) if metrics is not None else "no logged training step"
    markdown = f"Training: {summary}."
    if rows:
        markdown += "\n\n" + image("Training loss by optimizer step", loss_curve_png(rows))
    return StageReport(
        headline=[f"train: {summary}"],
        markdown=markdown,
        documents=[
            Document(
                key="train-metrics",
                description=f"Training metrics per logging step (train key {out.key})",
                table=[{k: r.get(k) for k in TRAIN_COLUMNS} for r in rows],
            )
        ],
    )


# ---------------------------------------------------------------------------------------------
# run summaries


def stages_table(stages: list[dict[str, Any]]) -> list[str]:
    """The run's stages as Markdown table lines (a run summary's `stages`): Cached or ran,
    seconds, rows in and out, failed rows, main output. The UI's summary artifact and
    `glyph report`'s report.md show the same table."""
    lines = [
        "| stage | status | seconds | rows in → out | errors | main output |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in stages:
        status = "Cached" if r["cached"] else "ran"
        lines.append(
            f"| {r['stage']} | {status} | {r['seconds']:.1f} | {r['rows_in']} → {r['rows_out']} "
            f"| {r.get('errors', 0)} | `{r['uri']}` |"
        )
    return lines


def summary_uri(store: Store, flow_run_id: str | None = None) -> str:
    """Where a run's summary is kept: per flow run, or the newest one (`flow_run_id` None)."""
    if flow_run_id is None:
        return store.uri(RUNS_DIR, LAST_NAME)
    return store.uri(RUNS_DIR, str(flow_run_id), SUMMARY_NAME)


def save_summary(store: Store, summary: dict[str, Any]) -> str:
    """Publish a run's summary under its flow run id and as the newest; returns the first URI."""
    data = json.dumps(summary, indent=2, default=str).encode()
    run_id = (summary.get("flow_run") or {}).get("id")
    uri = summary_uri(store, run_id) if run_id else summary_uri(store)
    store.publish_bytes(uri, data)
    if run_id:
        store.publish_bytes(summary_uri(store), data)
    return uri
