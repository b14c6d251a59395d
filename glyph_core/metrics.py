"""Statistics of the evaluation: rates with intervals, selectivity within each source, and the
metrics JSON (docs/evaluation.md documents every key).

* Rates get 95 % Wilson intervals: they stay inside [0, 1] and behave at 0 % and 100 %, where
  the normal approximation collapses to a zero-width interval on small groups.
* **Selectivity within each source is the headline.** Hard problems are mostly MATH and easy
  ones mostly GSM8K and SVAMP, so a model that writes glyphs whenever it sees LaTeX would look
  selective on the pooled numbers. Within a source the difficulty scale is the source's own
  (MATH level 1–5, GSM8K solution steps, SVAMP operators) and the source is held fixed:

  - per source, the AUROC of glyph use against difficulty: P(a glyph-using problem is harder
    than a problem without glyphs of the same source), ties ½;
  - the **within-source AUROC** pools only within-source pairs:
    ``Σ_s U_s / Σ_s n⁺_s n⁻_s`` (U_s the Mann–Whitney count of source s), i.e. every
    (glyph, no glyph) pair of problems from the same source counts once, and no pair mixes
    sources. It is 0.5 when, inside every source, glyph use ignores difficulty;
  - per source, glyph use on its hard bucket − on its easy bucket, and the
    **within-source hard − easy**: their Mantel–Haenszel weighted mean, weights
    ``n_hard n_easy / (n_hard + n_easy)``.

  The pooled numbers (all sources together, ``difficulty`` in [0, 1]) are kept, labelled
  *pooled*; they can be a source shortcut.
* Intervals of the selectivity numbers are percentile bootstraps over problems (seeded, so the
  same input gives the same interval), resampled within each source: every source keeps its
  size, as in the sample. Not within each sampling stratum: with one or two problems per
  stratum (the demo) that would give zero-width intervals; resampling the level mix as well
  is slightly conservative instead. Base and tuned share the resamples, so tuned − base
  differences get paired intervals. Problems of a source that agree on everything a statistic
  reads are one category, and a resample is a multinomial draw of category counts: 2,000
  resamples of 6,600 problems take a fraction of a second.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from glyph_core.config import BUCKETS

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# A bootstrap interval is only reported when the statistic is defined on this share of resamples.
MIN_DEFINED_SHARE = 0.5
TRUNCATION_WARN_RATE = 0.20
# The study's stated goal, within MATH.
STUDY_GOAL: dict[str, float] = {
    "glyph_use_levels_4_5_min": 0.85,
    "glyph_use_levels_1_2_max": 0.20,
    "auroc_min": 0.80,
}
BASE_LABEL = "base"
TUNED_LABEL = "tuned"
# (metric name, completion column): the rates of every group.
RATES: tuple[tuple[str, str], ...] = (
    ("emergence", "emerged"),
    ("valid", "valid"),
    ("accuracy", "correct"),
    ("truncated", "truncated"),
)
GROUPINGS: tuple[str, ...] = ("all", "bucket", "source", "source_bucket", "stratum")


# ---------------------------------------------------------------------------------------------
# scalar statistics


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (nan, nan) when n == 0."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends, not 1 - 1e-16
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def mean_ci(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean with a normal-approximation interval (tokens are bounded; fine for n ≳ 10)."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    m = sum(values) / n
    if n == 1:
        return (m, math.nan, math.nan)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return (m, m - half, m + half)


def auroc(labels: list[bool], scores: list[float]) -> float | None:
    """P(score of a positive > score of a negative), ties counting ½ (Mann–Whitney U / n₊n₋).

    None when either class is empty: selectivity is undefined if the model always or never
    uses glyphs.
    """
    pairs = sorted(zip(scores, labels, strict=True), key=lambda p: p[0])
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # mid-ranks over runs of tied scores
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        mid = (i + j) / 2 + 1
        rank_sum += mid * sum(1 for k in range(i, j + 1) if pairs[k][1])
        i = j + 1
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def bucket_order(b: str) -> tuple[int, str]:
    return (BUCKETS.index(b) if b in BUCKETS else len(BUCKETS), b)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# rates per group

TABLE_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("group_by", pa.string()),
        ("group", pa.string()),
        ("n", pa.int64()),
        *[(f"{name}{suffix}", pa.float64()) for name, _ in RATES for suffix in ("", "_lo", "_hi")],
        ("partial", pa.float64()),
        ("mean_tokens", pa.float64()),
        ("tokens_lo", pa.float64()),
        ("tokens_hi", pa.float64()),
    ]
)


def group_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """n, every rate of :data:`RATES` with its Wilson interval, partial use, mean tokens."""
    n = len(rows)
    out: dict[str, Any] = {"n": n}
    for name, col in RATES:
        k = sum(1 for r in rows if r[col])
        lo, hi = wilson(k, n)
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = (k / n if n else math.nan), lo, hi
    out["partial"] = sum(1 for r in rows if r["partial"]) / n if n else math.nan
    m, lo, hi = mean_ci([float(r["completion_tokens"]) for r in rows])
    out["mean_tokens"], out["tokens_lo"], out["tokens_hi"] = m, lo, hi
    return out


def _groups(rows: list[dict[str, Any]]) -> Iterable[tuple[str, str, list[dict[str, Any]]]]:
    """(group_by, group, rows) for every grouping of :data:`GROUPINGS`, in display order."""
    yield "all", "all", rows
    for b in sorted({r["bucket"] for r in rows}, key=bucket_order):
        yield "bucket", b, [r for r in rows if r["bucket"] == b]
    for s in sorted({r["source"] for r in rows}):
        yield "source", s, [r for r in rows if r["source"] == s]
    for s, b in sorted({(r["source"], r["bucket"]) for r in rows}, key=lambda x: (x[0], bucket_order(x[1]))):
        yield "source_bucket", f"{s}/{b}", [r for r in rows if r["source"] == s and r["bucket"] == b]
    strata = {r["stratum"]: (r["source"], r["level"]) for r in rows if r.get("stratum")}
    for st in sorted(strata, key=lambda k: (strata[k][0], _num_or_inf(strata[k][1]), k)):
        yield "stratum", st, [r for r in rows if r.get("stratum") == st]


def _num_or_inf(x: Any) -> float:
    return math.inf if x is None else float(x)


def aggregate(scored: pa.Table) -> pa.Table:
    """Per model, the rates of every grouping of :data:`GROUPINGS` (one row each)."""
    rows = scored.to_pylist()
    out: list[dict[str, Any]] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for group_by, group, sel in _groups(mine):
            out.append({"model": model, "group_by": group_by, "group": group, **group_stats(sel)})
    return pa.Table.from_pylist(out, schema=TABLE_SCHEMA)


# ---------------------------------------------------------------------------------------------
# bootstrap over category counts


@dataclass(frozen=True)
class Category:
    """Problems of one source that agree on everything a statistic reads."""

    source: str
    level: int | None
    difficulty: float
    bucket: str
    emerged: tuple[bool | None, ...]  # per model, None when that model lacks the problem


class Counts:
    """Category counts: row 0 of :attr:`observed` is the sample, rows of :attr:`resampled` are
    bootstrap resamples (each source keeps its size)."""

    def __init__(self, rows: list[dict[str, Any]], models: list[str], resamples: int, seed: int) -> None:
        problems: dict[str, dict[str, Any]] = {}
        for r in rows:
            p = problems.setdefault(r["id"], {"row": r, "emerged": {}})
            p["emerged"][r["model"]] = bool(r["emerged"])
        tally: dict[Category, int] = {}
        for p in problems.values():
            r = p["row"]
            cat = Category(
                source=r["source"],
                level=r.get("level"),
                difficulty=float(r["difficulty"]),
                bucket=r["bucket"],
                emerged=tuple(p["emerged"].get(m) for m in models),
            )
            tally[cat] = tally.get(cat, 0) + 1
        self.models = models
        self.categories = sorted(tally, key=repr)
        self.observed = np.array([[tally[c] for c in self.categories]], dtype=np.float64)
        rng = np.random.default_rng(seed)
        blocks = np.zeros((resamples, len(self.categories)))
        for source in sorted({c.source for c in self.categories}):
            cols = [i for i, c in enumerate(self.categories) if c.source == source]
            k = self.observed[0, cols]
            blocks[:, cols] = rng.multinomial(int(k.sum()), k / k.sum(), size=resamples)
        self.resampled = blocks

    def mask(self, keep: Callable[[Category], bool]) -> np.ndarray:
        return np.array([keep(c) for c in self.categories], dtype=np.float64)


Stat = Callable[[np.ndarray], np.ndarray]  # category counts (R, K) -> one value per row (R,)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _mann_whitney(counts: Counts, model: int, keep: Callable[[Category], bool], score: str) -> Stat:
    """(U, n⁺n⁻) of glyph use against ``score`` (a Category attribute) on the kept categories,
    as one (R, 2) array: U and the pair count add up over sources."""
    kept = [keep(c) and c.emerged[model] is not None for c in counts.categories]
    values = sorted({getattr(c, score) for c, k in zip(counts.categories, kept, strict=True) if k})
    column = {v: i for i, v in enumerate(values)}
    pos = np.zeros((len(counts.categories), len(values)))  # category -> its score's column
    neg = np.zeros_like(pos)
    for i, (c, k) in enumerate(zip(counts.categories, kept, strict=True)):
        if k:
            (pos if c.emerged[model] else neg)[i, column[getattr(c, score)]] = 1.0

    def stat(c: np.ndarray) -> np.ndarray:
        p, n = c @ pos, c @ neg  # (R, V): glyph users and non-users per score value
        below = np.cumsum(n, axis=1) - n
        u = (p * (below + 0.5 * n)).sum(axis=1)
        return np.stack([u, p.sum(axis=1) * n.sum(axis=1)], axis=1)

    return stat


def _auroc_of(mw: Stat) -> Stat:
    def stat(c: np.ndarray) -> np.ndarray:
        got = mw(c)
        return _ratio(got[:, 0], got[:, 1])

    return stat


def _first(pair: Stat) -> Stat:
    return lambda c: pair(c)[:, 0]


def _rate_diff(counts: Counts, model: int, keep: Callable[[Category], bool]) -> Stat:
    """(hard − easy, weight n_h n_e / (n_h + n_e)) of glyph use on the kept categories, (R, 2)."""

    def m(bucket: str, used: bool | None) -> np.ndarray:
        return counts.mask(
            lambda c: (
                keep(c)
                and c.bucket == bucket
                and c.emerged[model] is not None
                and (used is None or c.emerged[model] is used)
            )
        )

    hard_used, hard_all, easy_used, easy_all = (
        m("hard", True),
        m("hard", None),
        m("easy", True),
        m("easy", None),
    )

    def stat(c: np.ndarray) -> np.ndarray:
        nh, ne = c @ hard_all, c @ easy_all
        diff = _ratio(c @ hard_used, nh) - _ratio(c @ easy_used, ne)
        weight = _ratio(nh * ne, nh + ne)
        return np.stack([diff, np.nan_to_num(weight)], axis=1)

    return stat


def _pooled_over(parts: list[Stat], kind: str) -> Stat:
    """Combine per-source parts: Mann–Whitney counts add up; rate differences are weighted."""

    def stat(c: np.ndarray) -> np.ndarray:
        got = [p(c) for p in parts]
        if not got:
            return np.full(c.shape[0], np.nan)
        parts_ = np.stack(got)  # (sources, R, 2)
        if kind == "auroc":
            return _ratio(parts_[:, :, 0].sum(axis=0), parts_[:, :, 1].sum(axis=0))
        defined = ~np.isnan(parts_[:, :, 0])
        num = np.where(defined, np.nan_to_num(parts_[:, :, 0]) * parts_[:, :, 1], 0.0).sum(axis=0)
        den = np.where(defined, parts_[:, :, 1], 0.0).sum(axis=0)
        return _ratio(num, den)

    return stat


def _estimate(stat: Stat, counts: Counts) -> dict[str, float | None]:
    """Point value on the sample and the 95 % percentile interval over the resamples."""
    value = float(stat(counts.observed)[0])
    if math.isnan(value):
        return {"value": None, "lo": None, "hi": None}
    boot = stat(counts.resampled)
    boot = boot[~np.isnan(boot)]
    if boot.size < MIN_DEFINED_SHARE * counts.resampled.shape[0]:
        return {"value": value, "lo": None, "hi": None}
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"value": value, "lo": float(lo), "hi": float(hi)}


def _diff(a: Stat, b: Stat) -> Stat:
    return lambda c: a(c) - b(c)


# ---------------------------------------------------------------------------------------------
# selectivity


def _observed(counts: Counts, keep: Callable[[Category], bool]) -> int:
    return int(counts.observed[0] @ counts.mask(keep))


def _source_selectivity(counts: Counts, j: int, source: str) -> tuple[Stat, Stat, dict[str, Any]]:
    """Model ``j`` within ``source``: its Mann–Whitney counts against the raw level, its
    hard − easy pair, and their estimates with the numbers of problems behind them."""

    def here(c: Category) -> bool:
        return c.source == source and c.emerged[j] is not None

    def leveled(c: Category) -> bool:
        return here(c) and c.level is not None

    mw = _mann_whitney(counts, j, leveled, "level")
    rd = _rate_diff(counts, j, here)
    entry = {
        "auroc": {
            **_estimate(_auroc_of(mw), counts),
            "n_glyph": _observed(counts, lambda c: leveled(c) and bool(c.emerged[j])),
            "n_plain": _observed(counts, lambda c: leveled(c) and c.emerged[j] is False),
        },
        "hard_minus_easy": {
            **_estimate(_first(rd), counts),
            "n_hard": _observed(counts, lambda c: here(c) and c.bucket == "hard"),
            "n_easy": _observed(counts, lambda c: here(c) and c.bucket == "easy"),
        },
    }
    return mw, rd, entry


def _model_selectivity(
    counts: Counts, j: int, sources: list[str], rows: list[dict[str, Any]]
) -> tuple[dict[str, Stat], dict[str, Any]]:
    """Model ``j``: its statistics (for paired differences) and its selectivity entry."""
    st: dict[str, Stat] = {}
    mws: list[Stat] = []
    rds: list[Stat] = []
    by_source: dict[str, Any] = {}
    for s in sources:
        mw, rd, by_source[s] = _source_selectivity(counts, j, s)
        mws.append(mw)
        rds.append(rd)
        st[f"auroc:{s}"], st[f"hard_minus_easy:{s}"] = _auroc_of(mw), _first(rd)
    st["auroc"] = _pooled_over(mws, "auroc")
    st["hard_minus_easy"] = _pooled_over(rds, "diff")
    st["pooled_auroc"] = _auroc_of(_mann_whitney(counts, j, lambda c: True, "difficulty"))
    st["pooled_hard_minus_easy"] = _first(_rate_diff(counts, j, lambda c: True))
    pooled_auroc = _estimate(st["pooled_auroc"], counts)
    pooled_diff = _estimate(st["pooled_hard_minus_easy"], counts)
    valid_auroc = auroc([r["valid"] for r in rows], [r["difficulty"] for r in rows])
    entry = {
        "within_source": {
            "auroc": {
                **_estimate(st["auroc"], counts),
                "pairs": int(sum(mw(counts.observed)[0, 1] for mw in mws)),
            },
            "hard_minus_easy": _estimate(st["hard_minus_easy"], counts),
            "by_source": by_source,
        },
        "pooled": {"auroc": pooled_auroc, "hard_minus_easy": pooled_diff, "valid_auroc": valid_auroc},
        # The names from before within-source selectivity existed; the values are the pooled ones.
        "emergence_hard_minus_easy": pooled_diff["value"],
        "auroc_glyph_vs_difficulty": pooled_auroc["value"],
        "valid_auroc_vs_difficulty": valid_auroc,
    }
    return st, entry


def selectivity(
    scored: pa.Table, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, Any]:
    """``{"models": {model: ...}, "tuned_minus_base": ... or None}``: per model the within-source
    and the pooled selectivity with bootstrap intervals; with base and tuned, their difference
    (paired: both models share the resamples)."""
    rows = scored.to_pylist()
    models = list(dict.fromkeys(r["model"] for r in rows))
    counts = Counts(rows, models, resamples, seed)
    sources = sorted({c.source for c in counts.categories})
    stats: dict[str, dict[str, Stat]] = {}
    out: dict[str, Any] = {}
    for j, model in enumerate(models):
        stats[model], out[model] = _model_selectivity(
            counts, j, sources, [r for r in rows if r["model"] == model]
        )
    delta = None
    if BASE_LABEL in stats and TUNED_LABEL in stats:
        t, b = stats[TUNED_LABEL], stats[BASE_LABEL]

        def d(name: str) -> dict[str, float | None]:
            return _estimate(_diff(t[name], b[name]), counts)

        delta = {
            "within_source": {
                "auroc": d("auroc"),
                "hard_minus_easy": d("hard_minus_easy"),
                "by_source": {
                    s: {"auroc": d(f"auroc:{s}"), "hard_minus_easy": d(f"hard_minus_easy:{s}")}
                    for s in sources
                },
            },
            "pooled": {"auroc": d("pooled_auroc"), "hard_minus_easy": d("pooled_hard_minus_easy")},
        }
    return {"models": out, "tuned_minus_base": delta}


# ---------------------------------------------------------------------------------------------
# MATH per level, the study's goal, truncation, the original study's table

LEVEL_GROUPS: dict[str, tuple[int, ...]] = {"1-2": (1, 2), "4-5": (4, 5)}


def _rate(rows: list[dict[str, Any]], col: str) -> dict[str, Any]:
    n = len(rows)
    k = sum(1 for r in rows if r[col])
    lo, hi = wilson(k, n)
    return {
        "n": n,
        "k": k,
        "rate": k / n if n else None,
        "lo": None if n == 0 else lo,
        "hi": None if n == 0 else hi,
    }


def math_levels(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Glyph use (emergence) and valid structure per MATH level "1".."5" and per level group
    "1-2" and "4-5", each with its Wilson interval."""
    math_rows = [r for r in rows if r["source"] == "math" and r.get("level") is not None]
    groups: dict[str, tuple[int, ...]] = {str(lv): (lv,) for lv in range(1, 6)} | LEVEL_GROUPS
    out: dict[str, Any] = {}
    for name, levels in groups.items():
        sel = [r for r in math_rows if r["level"] in levels]
        out[name] = {"glyph_use": _rate(sel, "emerged"), "valid": _rate(sel, "valid")}
    return out


def study_goal(levels: dict[str, Any], math_auroc: float | None) -> dict[str, Any]:
    """The study's goal within MATH (:data:`STUDY_GOAL`), checked on the point estimates:
    ``met`` is False as soon as one known criterion fails, None while one is undefined (the
    AUROC when the model uses glyphs on all MATH problems or none) and the others pass."""
    hard = levels["4-5"]["glyph_use"]["rate"]
    easy = levels["1-2"]["glyph_use"]["rate"]
    checks = [
        None if hard is None else hard >= STUDY_GOAL["glyph_use_levels_4_5_min"],
        None if easy is None else easy <= STUDY_GOAL["glyph_use_levels_1_2_max"],
        None if math_auroc is None else math_auroc >= STUDY_GOAL["auroc_min"],
    ]
    met = False if False in checks else None if None in checks else True
    return {
        "glyph_use_levels_4_5": hard,
        "glyph_use_levels_1_2": easy,
        "auroc_vs_level": math_auroc,
        "met": met,
    }


def truncation_warnings(models: dict[str, Any], max_new_tokens: int | None) -> list[str]:
    """One sentence per model with a bucket or source whose truncation rate exceeds
    :data:`TRUNCATION_WARN_RATE`: its scores there measure the token budget more than the model."""
    out = []
    budget = f"evaluate.max_new_tokens ({max_new_tokens})" if max_new_tokens else "evaluate.max_new_tokens"
    for model, m in models.items():
        high = [
            f"{kind[3:]} {group} {100 * st['truncated']:.0f}% of {st['n']}"
            for kind in ("by_bucket", "by_source")
            for group, st in m[kind].items()
            if st.get("truncated") is not None and st["truncated"] > TRUNCATION_WARN_RATE
        ]
        if high:
            out.append(
                f"{model}: completions hit the token limit ({'; '.join(high)}); {budget} is probably too small"
            )
    return out


def original_study(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model, overall and per word-count bucket: emergence, valid, accuracy the original
    scripts' way (:mod:`glyph_core.original_study`)."""
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r.get("orig_bucket") is not None]

        def stats(sel: list[dict[str, Any]]) -> dict[str, Any]:
            n = len(sel)
            return {
                "n": n,
                **{
                    name: (sum(1 for r in sel if r[col]) / n if n else None)
                    for name, col in (
                        ("emergence", "orig_emerged"),
                        ("valid", "orig_valid"),
                        ("accuracy", "orig_correct"),
                    )
                },
            }

        out[model] = {
            "overall": stats(mine),
            "by_bucket": {b: stats([r for r in mine if r["orig_bucket"] == b]) for b in BUCKETS},
        }
    return out


# ---------------------------------------------------------------------------------------------
# the metrics JSON


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def build_metrics(
    scored: pa.Table,
    table: pa.Table,
    extra: dict[str, Any] | None = None,
    *,
    version: str,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """The metrics JSON (keys documented in docs/evaluation.md): per model the rates of every
    grouping, MATH per level, the study's goal, selectivity; tuned − base; warnings."""
    selected = selectivity(scored, resamples, seed)
    sel = selected["models"]
    trows = table.to_pylist()
    srows = scored.to_pylist()
    models: dict[str, Any] = {}

    def stats(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k not in ("model", "group_by", "group")}

    for model in dict.fromkeys(r["model"] for r in trows):
        mine = [r for r in trows if r["model"] == model]
        by = {g: {r["group"]: stats(r) for r in mine if r["group_by"] == g} for g in GROUPINGS}
        by_source_bucket: dict[str, dict[str, Any]] = {}
        for key, st in by["source_bucket"].items():
            source, bucket = key.split("/", 1)
            by_source_bucket.setdefault(source, {})[bucket] = st
        model_rows = [r for r in srows if r["model"] == model]
        reasons = [r["finish_reason"] for r in model_rows]
        levels = math_levels(model_rows)
        math_sel = sel[model]["within_source"]["by_source"].get("math", {}).get("auroc", {})
        models[model] = {
            "overall": by["all"]["all"],
            "by_bucket": by["bucket"],
            "by_source": by["source"],
            "by_source_bucket": by_source_bucket,
            "by_stratum": by["stratum"],
            "math_levels": levels,
            "study_goal": study_goal(levels, math_sel.get("value")),
            "selectivity": sel[model],
            "errors": reasons.count("error"),
            "truncated": reasons.count("length"),
        }
    config = (extra or {}).get("config") or {}
    metrics: dict[str, Any] = {
        "stage": "evaluate",
        "version": version,
        "models": models,
        "study_goal_criteria": STUDY_GOAL,
        "bootstrap": {"resamples": resamples, "seed": seed, "interval": 0.95, "resampled_within": "source"},
        "truncation_warn_rate": TRUNCATION_WARN_RATE,
        "warnings": truncation_warnings(models, config.get("max_new_tokens")),
        "original_study": original_study(srows),
        **(extra or {}),
    }
    if BASE_LABEL in models and TUNED_LABEL in models:
        delta: dict[str, Any] = {}
        for b, tuned in models[TUNED_LABEL]["by_bucket"].items():
            base = models[BASE_LABEL]["by_bucket"].get(b)
            if base:
                delta[b] = {
                    m: tuned[m] - base[m]
                    for m in ("emergence", "valid", "accuracy", "truncated", "mean_tokens")
                }
        metrics["tuned_minus_base"] = delta
        metrics["tuned_minus_base_selectivity"] = selected["tuned_minus_base"]
    return _nan_to_none(metrics)
