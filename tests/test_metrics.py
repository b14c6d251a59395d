"""The evaluation's statistics: Wilson, AUROC, within-source selectivity against brute force, the
bootstrap within sources (deterministic, paired, sized right, not degenerate on tiny strata), MATH per level and the study's goal.

Scored tables are built by hand with the columns the scorer writes; what they stand for (a model
that follows the source, one that follows difficulty) is said in each test.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from glyph_core.evaluate import COMPLETION_SCHEMA
from glyph_core.metrics import (
    Counts,
    aggregate,
    auroc,
    build_metrics,
    math_levels,
    mean_ci,
    selectivity,
    study_goal,
    wilson,
)
from tests.scored_rows import scored_row


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=COMPLETION_SCHEMA)


def _problems(math_per_level: int = 6, gsm_per_level: int = 6) -> list[tuple[str, str, int]]:
    out = [(f"math/{lv}/{i}", "math", lv) for lv in range(1, 6) for i in range(math_per_level)]
    out += [(f"gsm8k/{lv}/{i}", "gsm8k", lv) for lv in range(2, 8) for i in range(gsm_per_level)]
    return out


# -- scalar statistics -------------------------------------------------------------------------


def test_wilson_known_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert all(math.isnan(x) for x in wilson(0, 0))
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and lo < 2.0 < hi


def _brute_auroc(labels, scores):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_known_cases():
    assert auroc([False, False, True, True], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([True, True, False, False], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert auroc([True, False, True, False], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auroc([True, True], [0.1, 0.2]) is None
    assert auroc([], []) is None
    labels = [True, False, True, True, False, False, True, False]
    scores = [0.75, 0.5, 0.5, 1.0, 0.0, 0.25, 0.25, 0.75]
    assert auroc(labels, scores) == pytest.approx(_brute_auroc(labels, scores))


# -- within-source selectivity -------------------------------------------------------------------


def test_a_source_shortcut_looks_selective_pooled_but_not_within_sources():
    """Glyphs on 4 of 5 MATH problems and 1 of 10 GSM8K problems at *every* level: the model
    reacts to the source (LaTeX), not to difficulty. As in the real test split, MATH leans hard
    and GSM8K easy."""
    math_n = {1: 5, 2: 5, 3: 10, 4: 15, 5: 15}
    gsm_n = {2: 30, 3: 30, 4: 20, 5: 10, 6: 10, 7: 10}
    rows = [
        scored_row("tuned", f"math/{lv}/{i}", "math", lv, emerged=i % 5 != 0)
        for lv, n in math_n.items()
        for i in range(n)
    ]
    rows += [
        scored_row("tuned", f"gsm8k/{lv}/{i}", "gsm8k", lv, emerged=i % 10 == 0)
        for lv, n in gsm_n.items()
        for i in range(n)
    ]
    sel = selectivity(_table(rows), resamples=300)["models"]["tuned"]
    within = sel["within_source"]
    assert within["auroc"]["value"] == 0.5
    assert within["by_source"]["math"]["auroc"]["value"] == 0.5
    assert within["by_source"]["gsm8k"]["auroc"]["value"] == 0.5
    assert within["hard_minus_easy"]["value"] == pytest.approx(0.0)
    assert within["auroc"]["lo"] < 0.5 < within["auroc"]["hi"]
    assert sel["pooled"]["auroc"]["value"] > 0.6  # pooled, the shortcut passes for selectivity
    assert sel["pooled"]["hard_minus_easy"]["value"] > 0.2
    assert sel["auroc_glyph_vs_difficulty"] == sel["pooled"]["auroc"]["value"]


def test_a_difficulty_following_model_is_selective_within_each_source():
    """Glyphs exactly on MATH levels 4–5 and GSM8K ≥ 6 steps."""
    rows = [
        scored_row("tuned", pid, src, lv, emerged=(lv >= 4 if src == "math" else lv >= 6))
        for pid, src, lv in _problems()
    ]
    sel = selectivity(_table(rows), resamples=300)["models"]["tuned"]["within_source"]
    assert sel["auroc"]["value"] == 1.0 and sel["auroc"]["lo"] == 1.0
    assert sel["by_source"]["math"]["hard_minus_easy"]["value"] == 1.0
    assert sel["hard_minus_easy"]["value"] == 1.0
    assert (
        sel["by_source"]["math"]["auroc"]["n_glyph"] == 12
        and sel["by_source"]["math"]["auroc"]["n_plain"] == 18
    )


def test_within_source_auroc_equals_brute_force_over_same_source_pairs():
    rng = random.Random(3)
    rows = []
    for pid, src, lv in _problems(5, 4):
        p = 0.15 * lv if src == "math" else 0.1 * (lv - 1)
        rows.append(scored_row("tuned", pid, src, lv, emerged=rng.random() < p))
    got = selectivity(_table(rows), resamples=100)["models"]["tuned"]["within_source"]
    wins = pairs = 0.0
    per_source = {}
    for src in ("math", "gsm8k"):
        mine = [r for r in rows if r["source"] == src]
        pos = [r["level"] for r in mine if r["emerged"]]
        neg = [r["level"] for r in mine if not r["emerged"]]
        w = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
        wins, pairs = wins + w, pairs + len(pos) * len(neg)
        per_source[src] = w / (len(pos) * len(neg))
        assert got["by_source"][src]["auroc"]["value"] == pytest.approx(per_source[src])
    assert got["auroc"]["value"] == pytest.approx(wins / pairs)
    assert got["auroc"]["pairs"] == pairs


def test_within_source_hard_minus_easy_is_the_mantel_haenszel_mean():
    rng = random.Random(5)
    rows = [
        scored_row("tuned", pid, src, lv, emerged=rng.random() < (0.2 + 0.1 * lv))
        for pid, src, lv in _problems(4, 3)
    ]
    got = selectivity(_table(rows), resamples=50)["models"]["tuned"]["within_source"]
    num = den = 0.0
    for src in ("math", "gsm8k"):
        hard = [r["emerged"] for r in rows if r["source"] == src and r["bucket"] == "hard"]
        easy = [r["emerged"] for r in rows if r["source"] == src and r["bucket"] == "easy"]
        d = sum(hard) / len(hard) - sum(easy) / len(easy)
        assert got["by_source"][src]["hard_minus_easy"]["value"] == pytest.approx(d)
        w = len(hard) * len(easy) / (len(hard) + len(easy))
        num, den = num + w * d, den + w
    assert got["hard_minus_easy"]["value"] == pytest.approx(num / den)


def test_bootstrap_is_deterministic_paired_and_keeps_source_sizes():
    rng = random.Random(7)
    rows = []
    for pid, src, lv in _problems():
        rows.append(scored_row("base", pid, src, lv, emerged=rng.random() < 0.3))
        rows.append(scored_row("tuned", pid, src, lv, emerged=rng.random() < 0.1 * lv + 0.1))
    table = _table(rows)
    a, b = selectivity(table, resamples=400), selectivity(table, resamples=400)
    assert a == b
    other = selectivity(table, resamples=400, seed=1)
    assert (
        other["models"]["tuned"]["within_source"]["auroc"] != a["models"]["tuned"]["within_source"]["auroc"]
    )
    delta = a["tuned_minus_base"]["within_source"]["auroc"]
    t, s = (
        a["models"]["tuned"]["within_source"]["auroc"]["value"],
        a["models"]["base"]["within_source"]["auroc"]["value"],
    )
    assert delta["value"] == pytest.approx(t - s)
    assert delta["lo"] <= delta["value"] <= delta["hi"]

    counts = Counts(table.to_pylist(), ["base", "tuned"], resamples=50, seed=0)
    assert counts.observed.sum() == len(_problems())  # one count per problem, not per completion
    for source in ("math", "gsm8k"):
        cols = [i for i, c in enumerate(counts.categories) if c.source == source]
        assert np.all(counts.resampled[:, cols].sum(axis=1) == counts.observed[0, cols].sum())


def test_bootstrap_matches_a_naive_resampling_of_problems():
    """The multinomial draw over categories has the distribution of resampling problems with
    replacement within each source: compare the spread with a plain per-problem bootstrap."""
    rng = random.Random(11)
    problems = _problems(20, 20)
    rows = [scored_row("tuned", pid, src, lv, emerged=rng.random() < 0.12 * lv) for pid, src, lv in problems]
    fast = selectivity(_table(rows), resamples=2000)["models"]["tuned"]["within_source"]["auroc"]
    by_source: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    gen = np.random.default_rng(0)
    naive = []
    for _ in range(600):
        sample = [
            r
            for group in by_source.values()
            for r in (group[i] for i in gen.integers(0, len(group), len(group)))
        ]
        wins = pairs = 0.0
        for src in ("math", "gsm8k"):
            pos = [r["level"] for r in sample if r["source"] == src and r["emerged"]]
            neg = np.array([r["level"] for r in sample if r["source"] == src and not r["emerged"]])
            wins += sum(float((p > neg).sum() + 0.5 * (p == neg).sum()) for p in pos)
            pairs += len(pos) * len(neg)
        naive.append(wins / pairs)
    lo, hi = np.percentile(naive, [2.5, 97.5])
    assert fast["lo"] == pytest.approx(lo, abs=0.03) and fast["hi"] == pytest.approx(hi, abs=0.03)


def test_undefined_statistics_are_none_not_nan():
    rows = [scored_row("base", pid, src, lv, emerged=False) for pid, src, lv in _problems(2, 2)]
    sel = selectivity(_table(rows), resamples=50)["models"]["base"]
    assert sel["within_source"]["auroc"] == {"value": None, "lo": None, "hi": None, "pairs": 0}
    assert sel["pooled"]["auroc"]["value"] is None and sel["auroc_glyph_vs_difficulty"] is None
    assert sel["within_source"]["hard_minus_easy"]["value"] == 0.0  # never: 0 % hard − 0 % easy


# -- MATH per level, the study's goal, aggregation, the metrics JSON -----------------------------


def test_math_levels_and_the_study_goal():
    rows = []
    for lv in range(1, 6):
        for i in range(10):
            used = i < {1: 1, 2: 2, 3: 5, 4: 9, 5: 9}[lv]
            rows.append(scored_row("tuned", f"m{lv}{i}", "math", lv, emerged=used))
    levels = math_levels(rows)
    assert levels["1"]["glyph_use"] == {
        "n": 10,
        "k": 1,
        "rate": 0.1,
        "lo": pytest.approx(wilson(1, 10)[0]),
        "hi": pytest.approx(wilson(1, 10)[1]),
    }
    assert levels["1-2"]["glyph_use"]["rate"] == pytest.approx(0.15)
    assert levels["4-5"]["glyph_use"]["rate"] == pytest.approx(0.9)
    assert study_goal(levels, 0.86)["met"] is True
    assert study_goal(levels, 0.79)["met"] is False  # AUROC below 0.80
    rows[0]["emerged"] = rows[1]["emerged"] = rows[2]["emerged"] = True  # level 1: 30 %+
    assert study_goal(math_levels(rows), 0.86)["met"] is False
    assert study_goal(math_levels([]), None)["met"] is None
    everywhere = [scored_row("tuned", f"m{lv}", "math", lv, emerged=True) for lv in range(1, 6)]
    assert study_goal(math_levels(everywhere), None)["met"] is False  # 100 % on levels 1–2
    hard_only = [scored_row("tuned", f"m{lv}", "math", lv, emerged=lv >= 4) for lv in (1, 2, 4, 5)]
    assert study_goal(math_levels(hard_only), None)["met"] is None  # rates pass, AUROC unknown


def test_metrics_json_has_the_documented_keys():
    rng = random.Random(1)
    rows = []
    for pid, src, lv in _problems(3, 2):
        rows.append(scored_row("base", pid, src, lv, emerged=False, correct=rng.random() < 0.5))
        rows.append(
            scored_row(
                "tuned",
                pid,
                src,
                lv,
                emerged=rng.random() < 0.2 * lv,
                finish_reason="length" if (src, lv) == ("math", 5) else "stop",
                orig_bucket="hard" if lv > 3 else "easy",
            )
        )
    scored = _table(rows)
    metrics = build_metrics(
        scored, aggregate(scored), {"config": {"max_new_tokens": 64}}, version="2", resamples=100
    )
    assert set(metrics) >= {
        "stage",
        "version",
        "models",
        "study_goal_criteria",
        "bootstrap",
        "truncation_warn_rate",
        "warnings",
        "original_study",
        "tuned_minus_base",
        "tuned_minus_base_selectivity",
        "config",
    }
    tuned = metrics["models"]["tuned"]
    assert set(tuned) == {
        "overall",
        "by_bucket",
        "by_source",
        "by_source_bucket",
        "by_stratum",
        "math_levels",
        "study_goal",
        "selectivity",
        "errors",
        "truncated",
    }
    assert set(tuned["overall"]) == {
        "n",
        *(f"{m}{s}" for m in ("emergence", "valid", "accuracy", "truncated") for s in ("", "_lo", "_hi")),
        "partial",
        "mean_tokens",
        "tokens_lo",
        "tokens_hi",
    }
    assert tuned["by_source_bucket"]["math"]["hard"]["n"] == 6
    assert tuned["by_stratum"]["math/level=5"]["truncated"] == 1.0
    assert tuned["truncated"] == 3
    assert set(tuned["selectivity"]) == {
        "within_source",
        "pooled",
        "emergence_hard_minus_easy",
        "auroc_glyph_vs_difficulty",
        "valid_auroc_vs_difficulty",
    }
    assert set(tuned["selectivity"]["within_source"]["by_source"]) == {"math", "gsm8k"}
    assert metrics["warnings"] == [
        "tuned: completions hit the token limit (bucket hard 30% of 10); "
        "evaluate.max_new_tokens (64) is probably too small"
    ]
    assert metrics["models"]["tuned"]["by_source"]["math"]["truncated"] == 0.2  # not above 20 %: no warning
    assert metrics["original_study"]["tuned"]["by_bucket"]["hard"]["n"] == 14
    assert metrics["original_study"]["base"]["overall"]["emergence"] == 0.0


def test_one_problem_per_stratum_still_gets_a_real_interval():
    """The demo's sample: one problem per (source, level). Resampling within each stratum would
    never change it (a zero-width interval); within each source it does."""
    rows = [scored_row("tuned", f"math/{lv}", "math", lv, emerged=lv in (2, 4, 5)) for lv in range(1, 6)]
    rows += [scored_row("tuned", f"gsm8k/{n}", "gsm8k", n, emerged=n in (3, 6)) for n in range(2, 8)]
    auroc_ = selectivity(_table(rows), resamples=500)["models"]["tuned"]["within_source"]["auroc"]
    assert auroc_["lo"] < auroc_["value"] < auroc_["hi"]
