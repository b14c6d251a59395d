"""The evaluation report rendered from the metrics JSON (glyph_core/eval_report.py): what it shows,
in which order, with the pooled numbers labelled, and the same output from a JSON round trip
(so `glyph report` reading metrics.json shows what the stage wrote)."""

from __future__ import annotations

import json
import random

import pyarrow as pa

from glyph_core.eval_report import fmt_estimate, fmt_rate, headline_lines, markdown_report, plot_png
from glyph_core.evaluate import COMPLETION_SCHEMA, stratum_of
from glyph_core.metrics import aggregate, build_metrics, wilson

G, P, S, T, F = "\U0001f71e", "\U0001f706", "\U0001f702", "\U0001f703", "\U0001f75e"


def _metrics(truncate_hard: bool = False) -> dict:
    """Base never writes glyphs; tuned writes them with a probability rising with the level."""
    rng = random.Random(0)
    rows = []
    levels = [
        ("math", lv, {1: "easy", 2: "easy", 3: "medium", 4: "hard", 5: "hard"}[lv]) for lv in range(1, 6)
    ]
    levels += [("gsm8k", n, "easy" if n <= 3 else "medium" if n <= 5 else "hard") for n in (2, 3, 4, 5, 6)]
    levels += [("svamp", n, "easy" if n <= 1 else "medium") for n in (1, 2)]
    for source, level, bucket in levels:
        for i in range(8):
            pid = f"{source}/{level}/{i}"
            for model in ("base", "tuned"):
                used = model == "tuned" and rng.random() < 0.18 * level
                cut = truncate_hard and model == "tuned" and bucket == "hard"
                rows.append(
                    {
                        "model": model,
                        "id": pid,
                        "source": source,
                        "bucket": bucket,
                        "difficulty": level / 6,
                        "level": level,
                        "stratum": stratum_of(source, level),
                        "finish_reason": "length" if cut else "stop",
                        "truncated": cut,
                        "completion_tokens": 100,
                        "emerged": used,
                        "partial": False,
                        "valid": used,
                        "correct": i % 2 == 0,
                        "violations": [],
                        "glyph_kinds": 5 if used else 0,
                        "orig_bucket": "hard" if level >= 4 else "easy",
                        "orig_emerged": used,
                        "orig_valid": used,
                        "orig_correct": i % 3 == 0,
                    }
                )
    scored = pa.Table.from_pylist(rows, schema=COMPLETION_SCHEMA)
    extra = {"n_problems": len(rows) // 2, "config": {"max_new_tokens": 256}}
    return build_metrics(scored, aggregate(scored), extra, version="2", resamples=200)


def test_report_puts_within_source_selectivity_first_and_labels_the_pooled_numbers():
    metrics = _metrics()
    md = markdown_report(metrics)
    order = [
        "## Promptless evaluation: base vs tuned",
        "### Selectivity within each source (headline)",
        "### Glyph use by MATH level",
        "### By difficulty bucket (all sources)",
        "### Per source",
        "#### MATH",
        "#### GSM8K",
        "#### SVAMP",
        "### Pooled over sources (can be a source shortcut)",
    ]
    positions = [md.index(h) for h in order]
    assert positions == sorted(positions)
    tuned = metrics["models"]["tuned"]["selectivity"]
    headline_row = next(line for line in md.splitlines() if line.startswith("| tuned | "))
    assert fmt_estimate(tuned["within_source"]["auroc"]) in headline_row
    assert fmt_estimate(tuned["within_source"]["by_source"]["math"]["auroc"]) in headline_row
    assert "| tuned − base (paired) |" in md
    assert "MATH AUROC vs level" in md and "GSM8K AUROC vs solution steps" in md
    pooled = md[md.index("### Pooled over sources") :]
    assert fmt_estimate(tuned["pooled"]["auroc"]) in pooled
    lv = metrics["models"]["tuned"]["math_levels"]["4-5"]["glyph_use"]
    assert fmt_rate(lv["rate"], lv["lo"], lv["hi"]) in md
    assert "Warning" not in md
    assert "original study" not in md


def test_report_warns_when_many_completions_hit_the_token_limit():
    md = markdown_report(_metrics(truncate_hard=True))
    assert (
        "> **Warning:** tuned: completions hit the token limit (bucket hard 100% of 24; source math 40% of 40); "
        "evaluate.max_new_tokens (256) is probably too small." in md
    )
    assert md.count("Warning") == 1  # base is never cut
    row = next(line for line in md.splitlines() if line.startswith("| hard | tuned | 24 |"))
    assert row.split(" | ")[6] == fmt_rate(1.0, *wilson(24, 24))  # the truncated column


def test_original_study_table_on_request():
    metrics = _metrics()
    md = markdown_report(metrics, original_study=True)
    section = md[md.index("### The original study's definitions") :]
    orig = metrics["original_study"]["tuned"]["by_bucket"]["hard"]
    assert f"| hard | tuned | {orig['n']} | {fmt_rate(orig['emergence'], None, None)} |" in section
    assert "| medium |" not in section  # no problem fell in it
    assert "looping output that repeats 🝞 counts" in section


def test_report_renders_the_same_from_the_json_file():
    metrics = _metrics(truncate_hard=True)
    again = json.loads(json.dumps(metrics))
    assert markdown_report(again, original_study=True) == markdown_report(metrics, original_study=True)
    assert headline_lines(again) == headline_lines(metrics)


def test_headline_lines():
    metrics = _metrics(truncate_hard=True)
    lines = headline_lines(metrics)
    tuned = metrics["models"]["tuned"]["selectivity"]["within_source"]
    assert next(line for line in lines if line.startswith("tuned: within")).startswith(
        f"tuned: within-source selectivity AUROC {fmt_estimate(tuned['auroc'])} (MATH "
    )
    assert any(line.startswith("tuned: MATH glyph use levels 1–2 ") for line in lines)
    # base never writes glyphs, so its AUROC and the paired AUROC difference are undefined
    assert any(line.startswith("tuned − base: within-source AUROC –, hard − easy +") for line in lines)
    assert any(
        line.startswith("warning: tuned: completions hit the token limit (bucket hard 100% of 24")
        for line in lines
    )
    assert lines[-1].startswith("tuned, pooled over sources (can be a source shortcut): AUROC ")


def test_formatting_of_missing_values():
    assert fmt_rate(None, None, None) == "–" and fmt_rate(float("nan"), 0.0, 1.0) == "–"
    assert fmt_estimate({"value": None, "lo": None, "hi": None}) == "–"
    assert fmt_estimate({"value": 0.5, "lo": None, "hi": None}) == "0.50"
    assert fmt_estimate({"value": 0.1, "lo": -0.05, "hi": 0.2}, signed=True) == "+0.10 [-0.05, +0.20]"


def test_plot_is_a_png_with_or_without_math():
    metrics = _metrics()
    png = plot_png(metrics)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for m in metrics["models"].values():
        for key in m["math_levels"]:
            m["math_levels"][key]["glyph_use"]["n"] = 0
    assert plot_png(metrics)[:4] == b"\x89PNG"
    assert "### Glyph use by MATH level" not in markdown_report(metrics)
