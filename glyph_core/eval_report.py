"""The evaluation report, rendered from the metrics JSON alone: the CLI, the Prefect UI artifact
and ``glyph report`` call these pure functions and so show the same thing.

* :func:`markdown_report` — the headline (selectivity within each source, with bootstrap
  intervals), glyph use per MATH level against the study's goal, base vs tuned per difficulty
  bucket and per source (with the truncation rate, and a warning when it is high), the pooled
  numbers labelled as such, and on request the original study's table;
* :func:`headline_lines` — the same headline as a few plain lines, for a terminal;
* :func:`plot_png` — emergence and accuracy per bucket, and glyph use against MATH level;
* :func:`markdown_table` / :func:`display_rows` — the per-bucket table from the stage's table
  Parquet (what ``glyph report`` showed before the metrics carried everything).
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa

from glyph_core.config import BUCKETS
from glyph_core.metrics import BASE_LABEL, TUNED_LABEL, bucket_order

SOURCE_NAMES = {"math": "MATH", "gsm8k": "GSM8K", "svamp": "SVAMP"}
# What "hard" and "easy" mean within each source (glyph_core/unify.py cuts them).
SOURCE_SCALES = {
    "math": ("level", "levels 4–5 vs 1–2"),
    "gsm8k": ("solution steps", "≥ 6 vs ≤ 3 steps"),
    "svamp": ("operators", "≥ 3 vs ≤ 1 operators"),
}
RATE_COLUMNS = (
    ("emergence", "emergence"),
    ("valid", "valid structure"),
    ("accuracy", "accuracy"),
    ("truncated", "truncated"),
)


# ---------------------------------------------------------------------------------------------
# formatting


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and x != x)


def fmt_rate(p: float | None, lo: float | None, hi: float | None) -> str:
    """``83.3% [44–97]``; ``–`` when undefined."""
    if p is None or _missing(p):
        return "–"
    if lo is None or hi is None or _missing(lo) or _missing(hi):
        return f"{100 * p:.1f}%"
    return f"{100 * p:.1f}% [{100 * lo:.0f}–{100 * hi:.0f}]"


def fmt_estimate(e: dict[str, Any] | None, *, signed: bool = False) -> str:
    """``0.83 [0.78–0.88]`` (``+0.45 [+0.30, +0.60]`` when signed); ``–`` when undefined."""
    if not e or _missing(e.get("value")):
        return "–"
    f = "{:+.2f}" if signed else "{:.2f}"
    value = f.format(e["value"])
    if _missing(e.get("lo")) or _missing(e.get("hi")):
        return value
    sep = ", " if signed else "–"
    return f"{value} [{f.format(e['lo'])}{sep}{f.format(e['hi'])}]"


def _tokens(x: float | None) -> str:
    return "–" if _missing(x) else f"{x:.0f}"


def _source_name(s: str) -> str:
    return SOURCE_NAMES.get(s, s)


def _models(metrics: dict[str, Any]) -> list[str]:
    """Base first, then tuned, then any other label."""
    names = list(metrics.get("models", {}))
    return sorted(names, key=lambda m: ({BASE_LABEL: 0, TUNED_LABEL: 1}.get(m, 2), m))


# ---------------------------------------------------------------------------------------------
# rate tables


def _rate_table(rows: list[dict[str, Any]], first: str) -> list[str]:
    """A Markdown table of rows with ``group``, ``model``, ``n``, the rates and mean tokens."""
    head = f"| {first} | model | n | " + " | ".join(t for _, t in RATE_COLUMNS) + " | mean tokens |"
    lines = [head, "|---|---|---:|" + "---|" * len(RATE_COLUMNS) + "---:|"]
    for r in rows:
        rates = " | ".join(
            fmt_rate(r.get(name), r.get(f"{name}_lo"), r.get(f"{name}_hi")) for name, _ in RATE_COLUMNS
        )
        lines.append(
            f"| {r['group']} | {r['model']} | {r['n']} | {rates} | {_tokens(r.get('mean_tokens'))} |"
        )
    return lines


def display_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The side-by-side rows of the stage's table: per bucket and overall, model next to model."""
    rows = [r for r in table.to_pylist() if r["group_by"] in ("bucket", "all")]
    return sorted(
        rows, key=lambda r: (bucket_order(r["group"]) if r["group"] != "all" else (99, ""), r["model"])
    )


def markdown_table(table: pa.Table) -> str:
    """Base vs tuned per bucket and overall, from the stage's table Parquet."""
    return "\n".join(_rate_table(display_rows(table), "bucket")) + "\n"


def _bucket_rows(metrics: dict[str, Any], pick: Any) -> list[dict[str, Any]]:
    """Rows for :func:`_rate_table`: ``pick(model metrics)`` → {bucket: stats}, model by model."""
    models = _models(metrics)
    per_model = {m: pick(metrics["models"][m]) for m in models}
    buckets = sorted({b for groups in per_model.values() for b in groups}, key=bucket_order)
    return [{"group": b, "model": m, **per_model[m][b]} for b in buckets for m in models if b in per_model[m]]


# ---------------------------------------------------------------------------------------------
# sections


def _sources(metrics: dict[str, Any]) -> list[str]:
    found = {
        s
        for m in metrics.get("models", {}).values()
        for s in m.get("selectivity", {}).get("within_source", {}).get("by_source", {})
    }
    return sorted(found, key=lambda s: (list(SOURCE_NAMES).index(s) if s in SOURCE_NAMES else 99, s))


def _selectivity_section(metrics: dict[str, Any]) -> list[str]:
    sources = _sources(metrics)
    cols = ["within-source AUROC", "within-source hard − easy"]
    for s in sources:
        scale = SOURCE_SCALES.get(s, ("level", "hard vs easy"))[0]
        cols += [f"{_source_name(s)} AUROC vs {scale}", f"{_source_name(s)} hard − easy"]
    lines = [
        "### Selectivity within each source (headline)",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]

    def row(name: str, sel: dict[str, Any], signed_auroc: bool) -> str:
        within = sel.get("within_source", {})
        cells = [
            fmt_estimate(within.get("auroc"), signed=signed_auroc),
            fmt_estimate(within.get("hard_minus_easy"), signed=True),
        ]
        for s in sources:
            src = within.get("by_source", {}).get(s, {})
            cells += [
                fmt_estimate(src.get("auroc"), signed=signed_auroc),
                fmt_estimate(src.get("hard_minus_easy"), signed=True),
            ]
        return f"| {name} | " + " | ".join(cells) + " |"

    for m in _models(metrics):
        lines.append(row(m, metrics["models"][m]["selectivity"], False))
    delta = metrics.get("tuned_minus_base_selectivity")
    if delta:
        lines.append(row("tuned − base (paired)", delta, True))
    scales = "; ".join(f"{_source_name(s)} {SOURCE_SCALES[s][1]}" for s in sources if s in SOURCE_SCALES)
    lines += [
        "",
        "AUROC: the probability that a problem on which the model writes glyphs is harder than a "
        "problem *of the same source* on which it does not (ties ½; 0.5 = glyph use ignores "
        "difficulty). The within-source AUROC pools only such same-source pairs, so a model that "
        "writes glyphs whenever it sees LaTeX gains nothing from it. Hard − easy: glyph use on a "
        f"source's hard bucket minus its easy bucket ({scales}); the within-source value weights "
        "the sources by n_hard·n_easy/(n_hard + n_easy). Intervals: 95 % percentile bootstrap "
        "over problems.",
    ]
    return lines


def _math_level_section(metrics: dict[str, Any]) -> list[str]:
    models = [m for m in _models(metrics) if metrics["models"][m].get("math_levels", {}).get("4-5")]
    if not any(metrics["models"][m]["math_levels"]["4-5"]["glyph_use"]["n"] for m in models):
        return []
    goal = metrics.get("study_goal_criteria", {})
    lines = [
        "### Glyph use by MATH level",
        "",
        "| model | level 1 | level 2 | level 3 | level 4 | level 5 | levels 1–2 | levels 4–5 | study goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        levels = metrics["models"][m]["math_levels"]
        cells = []
        for key in ("1", "2", "3", "4", "5", "1-2", "4-5"):
            g = levels[key]["glyph_use"]
            cells.append(f"{fmt_rate(g['rate'], g['lo'], g['hi'])} (n {g['n']})")
        met = metrics["models"][m].get("study_goal", {}).get("met")
        cells.append({True: "met", False: "not met", None: "–"}[met])
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if goal:
        lines += [
            "",
            "The study's goal, within MATH: glyph use on levels 4–5 ≥ "
            f"{100 * goal['glyph_use_levels_4_5_min']:.0f} %, on levels 1–2 ≤ "
            f"{100 * goal['glyph_use_levels_1_2_max']:.0f} %, AUROC against level ≥ {goal['auroc_min']:.2f} "
            "(checked on the point estimates).",
        ]
    return lines


def _per_source_sections(metrics: dict[str, Any]) -> list[str]:
    sources = sorted(
        {s for m in metrics["models"].values() for s in m.get("by_source_bucket", {})},
        key=lambda s: (list(SOURCE_NAMES).index(s) if s in SOURCE_NAMES else 99, s),
    )
    lines: list[str] = ["### Per source", ""]
    for s in sources:
        rows = _bucket_rows(metrics, lambda mm, s=s: mm.get("by_source_bucket", {}).get(s, {}))
        rows += [
            {"group": "all", "model": m, **metrics["models"][m]["by_source"][s]}
            for m in _models(metrics)
            if s in metrics["models"][m].get("by_source", {})
        ]
        lines += [f"#### {_source_name(s)}", "", *_rate_table(rows, "bucket"), ""]
    return lines[:-1]


def _pooled_section(metrics: dict[str, Any]) -> list[str]:
    lines = [
        "### Pooled over sources (can be a source shortcut)",
        "",
        "| model | pooled AUROC vs difficulty | pooled hard − easy | valid-structure AUROC (pooled) |",
        "|---|---|---|---|",
    ]
    for m in _models(metrics):
        pooled = metrics["models"][m]["selectivity"].get("pooled", {})
        valid = pooled.get("valid_auroc")
        lines.append(
            f"| {m} | {fmt_estimate(pooled.get('auroc'))} | {fmt_estimate(pooled.get('hard_minus_easy'), signed=True)} "
            f"| {'–' if _missing(valid) else f'{valid:.2f}'} |"
        )
    lines += [
        "",
        "Hard problems are mostly MATH and easy ones mostly GSM8K and SVAMP, so these numbers "
        "also reward telling the sources apart; the within-source numbers above do not.",
    ]
    return lines


def _original_section(metrics: dict[str, Any]) -> list[str]:
    orig = metrics.get("original_study") or {}
    if not orig:
        return []
    lines = [
        "### The original study's definitions (for comparison with its numbers)",
        "",
        "| bucket (word-count heuristic) | model | n | emergence (any of 🜞🜆🜂🜃) | valid (all four present) "
        "| accuracy (last number, string equality) |",
        "|---|---|---:|---|---|---|",
    ]
    models = [m for m in _models(metrics) if m in orig]
    for b in (*BUCKETS, "all"):
        for m in models:
            st = orig[m]["overall"] if b == "all" else orig[m]["by_bucket"].get(b)
            if not st or not st["n"]:
                continue
            cells = " | ".join(fmt_rate(st[k], None, None) for k in ("emergence", "valid", "accuracy"))
            lines.append(f"| {b} | {m} | {st['n']} | {cells} |")
    lines += [
        "",
        "Emergence does not count 🝞, valid only asks that the four glyphs occur somewhere (a looping "
        "output that repeats 🝞 counts), the bucket comes from the question's words, numbers and cue "
        "words, and accuracy compares the last number as a string. docs/evaluation.md compares the "
        "definitions.",
    ]
    return lines


def markdown_report(metrics: dict[str, Any], *, original_study: bool = False) -> str:
    """The whole evaluation report as Markdown, from the metrics JSON alone."""
    config = metrics.get("config") or {}
    boot = metrics.get("bootstrap") or {}
    budget = f", {config['max_new_tokens']} new tokens" if config.get("max_new_tokens") else ""
    lines = [
        "## Promptless evaluation: base vs tuned",
        "",
        f"{metrics.get('n_problems', '?')} held-out problems (latent prompt, greedy{budget}), sampled "
        "per (source, difficulty level). Rates with 95 % Wilson intervals; selectivity with 95 % "
        f"bootstrap intervals ({boot.get('resamples', '?')} resamples within sources).",
        "",
    ]
    for w in metrics.get("warnings", []):
        lines += [f"> **Warning:** {w}.", ""]
    lines += _selectivity_section(metrics) + [""]
    math_lines = _math_level_section(metrics)
    if math_lines:
        lines += math_lines + [""]
    lines += [
        "### By difficulty bucket (all sources)",
        "",
        *_rate_table(
            _bucket_rows(metrics, lambda mm: mm["by_bucket"])
            + [{"group": "all", "model": m, **metrics["models"][m]["overall"]} for m in _models(metrics)],
            "bucket",
        ),
        "",
        *_per_source_sections(metrics),
        "",
        *_pooled_section(metrics),
    ]
    if original_study:
        lines += ["", *_original_section(metrics)]
    return "\n".join(lines) + "\n"


def headline_lines(metrics: dict[str, Any]) -> list[str]:
    """The headline in a few plain lines: within-source selectivity per model, tuned − base,
    MATH glyph use against the study's goal, the warnings, and the pooled numbers labelled."""
    out = []
    for m in _models(metrics):
        mm = metrics["models"][m]
        within = mm["selectivity"]["within_source"]
        per_source = ", ".join(
            f"{_source_name(s)} {fmt_estimate(within['by_source'][s].get('auroc'))}"
            for s in _sources(metrics)
            if s in within.get("by_source", {})
        )
        out.append(
            f"{m}: within-source selectivity AUROC {fmt_estimate(within.get('auroc'))} ({per_source}); "
            f"hard − easy {fmt_estimate(within.get('hard_minus_easy'), signed=True)}"
        )
        levels = mm.get("math_levels", {})
        if levels.get("4-5", {}).get("glyph_use", {}).get("n"):
            lo, hi = levels["1-2"]["glyph_use"], levels["4-5"]["glyph_use"]
            met = {True: "met", False: "not met", None: "undecided"}[mm.get("study_goal", {}).get("met")]
            out.append(
                f"{m}: MATH glyph use levels 1–2 {fmt_rate(lo['rate'], lo['lo'], lo['hi'])}, "
                f"levels 4–5 {fmt_rate(hi['rate'], hi['lo'], hi['hi'])}; study goal {met}"
            )
    delta = metrics.get("tuned_minus_base_selectivity")
    if delta:
        out.append(
            "tuned − base: within-source AUROC "
            f"{fmt_estimate(delta['within_source'].get('auroc'), signed=True)}, hard − easy "
            f"{fmt_estimate(delta['within_source'].get('hard_minus_easy'), signed=True)}"
        )
    out += [f"warning: {w}" for w in metrics.get("warnings", [])]
    for m in _models(metrics):
        pooled = metrics["models"][m]["selectivity"].get("pooled", {})
        out.append(
            f"{m}, pooled over sources (can be a source shortcut): AUROC {fmt_estimate(pooled.get('auroc'))}, "
            f"hard − easy {fmt_estimate(pooled.get('hard_minus_easy'), signed=True)}"
        )
    return out


# ---------------------------------------------------------------------------------------------
# plot


def _err(p: float | None, lo: float | None, hi: float | None) -> tuple[float, float, float]:
    """A rate and its error-bar lengths below and above (0 where the interval is missing)."""
    if p is None or _missing(p):
        return (float("nan"), 0.0, 0.0)
    below = 0.0 if lo is None or _missing(lo) else max(0.0, p - lo)
    above = 0.0 if hi is None or _missing(hi) else max(0.0, hi - p)
    return (p, below, above)


def plot_png(metrics: dict[str, Any]) -> bytes:
    """Emergence and accuracy by bucket (one bar per model) and glyph use against MATH level
    (one line per model, legend with its within-MATH AUROC); 95 % Wilson error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _models(metrics)
    buckets = sorted({b for m in models for b in metrics["models"][m]["by_bucket"]}, key=bucket_order)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / max(1, len(models))
    for ax, metric, title in ((axes[0], "emergence", "Glyph emergence"), (axes[1], "accuracy", "Accuracy")):
        for j, m in enumerate(models):
            xs, ys, lo, hi = [], [], [], []
            for i, b in enumerate(buckets):
                st = metrics["models"][m]["by_bucket"].get(b)
                if st is None:
                    continue
                p, e_lo, e_hi = _err(st[metric], st[f"{metric}_lo"], st[f"{metric}_hi"])
                xs.append(i + (j - (len(models) - 1) / 2) * width)
                ys.append(p)
                lo.append(e_lo)
                hi.append(e_hi)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=m)
        ax.set_xticks(range(len(buckets)), buckets)
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.set_xlabel("difficulty bucket")
    axes[0].set_ylabel("rate (95% CI)")
    axes[1].legend(loc="upper right")
    ax = axes[2]
    levels = ("1", "2", "3", "4", "5")
    drawn = False
    for j, m in enumerate(models):
        per_level = metrics["models"][m].get("math_levels", {})
        pts = [
            (int(lv), _err(g["rate"], g["lo"], g["hi"]))
            for lv in levels
            if (g := per_level.get(lv, {}).get("glyph_use")) and g["n"]
        ]
        if not pts:
            continue
        drawn = True
        auroc = metrics["models"][m]["selectivity"]["within_source"]["by_source"].get("math", {}).get("auroc")
        xs = [x + (j - (len(models) - 1) / 2) * 0.08 for x, _ in pts]
        ax.errorbar(
            xs,
            [p for _, (p, _, _) in pts],
            yerr=[[e for _, (_, e, _) in pts], [e for _, (_, _, e) in pts]],
            marker="o",
            capsize=3,
            label=f"{m} (AUROC {fmt_estimate(auroc)})",
        )
    if drawn:
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no MATH problems", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(range(1, 6))
    ax.set_xlim(0.5, 5.5)
    ax.set_ylim(0, 1.05)
    ax.set_title("Glyph use by MATH level")
    ax.set_xlabel("MATH level")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
