"""Sweeps, without Prefect: the plan (which pipeline runs), the record (what they did), and the
comparison (one table, one frontier plot, the best point and the rule that chose it).

A sweep is a base profile, `--set` overrides applied to every point, and the settings that vary:
a grid (`--grid rewrite.natural_ratio=0.5,1,2`: every combination of the values given) and/or a
list of explicit points (a YAML file's `points:`; each is combined with every grid combination).
Each point is one run of the pipeline with `{**sets, **point}` as its overrides, so points that
agree on a stage's inputs and config share that stage through the content-keyed cache: in a
grid over train settings, unify, generate, filter and rewrite run once.

The comparison reads nothing but each point's `metrics.json` (docs/evaluation.md, section 6):
`point_row` picks the numbers a sweep compares out of it, and every view (the Prefect
artifacts, `glyph sweep`, `glyph report --sweep`, the folder a study keeps) is rendered from
those rows by `comparison_markdown` and `frontier_png`.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from glyph_core.config import BUCKETS, StrictModel
from glyph_core.errors import GlyphError
from glyph_core.eval_report import fmt_estimate, fmt_rate
from glyph_core.metrics import BASE_LABEL, STUDY_GOAL, TUNED_LABEL
from glyph_core.profiles import load_profile, parse_value
from glyph_core.storage import StorageError, Store, canonical_json

SWEEP_DIR = "_sweeps"
RECORD = "sweep.json"
RECORD_VERSION = 1

BEST_RULE = (
    "Best point: among the points whose tuned model's accuracy is not below its base model's "
    "(overall, on the same held-out problems, point estimates) and whose within-source AUROC is "
    "defined, those that meet the study's goal come first; then the highest within-source AUROC "
    "of glyph use against difficulty (tuned, the headline); ties go to the lower glyph use on "
    "MATH levels 1–2, then to the point's name."
)


class SweepError(GlyphError):
    """A sweep that cannot be planned (bad grid, clashing settings) or found."""


# ---------------------------------------------------------------------------------------------
# the plan


class SweepSpec(StrictModel):
    """A sweep file (YAML): every key optional; the command line adds to it."""

    profile: str | None = Field(default=None, description="base profile (tiny, demo, full)")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted settings for every point")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="dotted setting -> values; every combination is a point"
    )
    points: list[dict[str, Any]] = Field(
        default_factory=list,
        description="explicit points: dotted settings, and an optional `name`; each is combined "
        "with every grid combination (a named point then gets -1, -2, ... per combination)",
    )


def load_spec(path: str | Path) -> SweepSpec:
    """A sweep file, checked before anything runs: one error naming the file and what is wrong."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SweepError(f"sweep file {p}: {exc}") from None
    if not isinstance(data, dict):
        raise SweepError(
            f"sweep file {p}: expected a mapping with set/grid/points, got {type(data).__name__}"
        )
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:  # paths such as grid."train.epochs" are not identifiers: name them all
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {str(e['msg']).replace('Input should be', 'must be')}"
            if e["type"] != "extra_forbidden"
            else f"{'.'.join(str(part) for part in e['loc'])}: unknown key (expected profile, set, grid, points)"
            for e in exc.errors()
        )
        raise SweepError(f"sweep file {p}: {problems}") from None


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """`["a.b=1,2", "c=[0.5, 1]"]` → `{"a.b": [1, 2], "c": [0.5, 1]}`: each value as `--set`
    parses it (JSON where it parses, else the string)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise SweepError(f"--grid expects key=value1,value2,..., got {item!r}")
        whole = parse_value(text) if text.lstrip().startswith("[") else None
        values = whole if isinstance(whole, list) else [parse_value(v.strip()) for v in text.split(",")]
        if key in grid:
            raise SweepError(f"--grid {key} given twice")
        grid[key] = values
    return grid


@dataclass(frozen=True)
class Point:
    name: str
    settings: dict[str, Any]
    """The settings this point varies (dotted paths), on top of the sweep's `set`."""

    def label(self, swept: Iterable[str] | None = None) -> str:
        """`natural_ratio=0.5 epochs=3`: the last part of each dotted path, or the whole path
        where two swept paths end alike."""
        keys = list(swept) if swept is not None else list(self.settings)
        tails = [k.rsplit(".", 1)[-1] for k in keys]
        parts = []
        for k, tail in zip(keys, tails, strict=True):
            if k in self.settings:
                shown = k if tails.count(tail) > 1 else tail
                parts.append(f"{shown}={_show(self.settings[k])}")
        return " ".join(parts) or "base"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class SweepPlan:
    profile: str
    sets: dict[str, Any]
    grid: dict[str, list[Any]]
    explicit: list[dict[str, Any]]
    points: list[Point]

    @property
    def swept(self) -> list[str]:
        """Every setting some point varies, in the order first given."""
        return list(dict.fromkeys(k for p in self.points for k in p.settings))

    def overrides(self, point: Point) -> dict[str, Any]:
        return {**self.sets, **point.settings}


def _dotted(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data[part]
    return data


def plan_sweep(
    profile: str,
    sets: Mapping[str, Any] | None = None,
    grid: Mapping[str, list[Any]] | None = None,
    points: list[dict[str, Any]] | None = None,
) -> SweepPlan:
    """Every point of the sweep, each one's pipeline config validated, before anything runs.

    `sets` apply to every point; an explicit point's own settings win over them (`set` holds the
    recipe's defaults, a point changes one lever). Every point then states every swept setting
    as it runs with it (validated; from `sets` or the profile where the point gave none), so the
    table has no blank cells and two points that would run alike are caught.

    Refused: nothing to sweep; a grid setting also in `sets` (the grid would always win) or in a
    point; a grid setting with no values; two points with the same settings or name; a point
    whose config is invalid (the error names the point and the setting)."""
    sets, grid, explicit = dict(sets or {}), dict(grid or {}), [dict(p) for p in points or []]
    if not grid and not explicit:
        raise SweepError("nothing to sweep: give --grid key=v1,v2 (or a sweep file with grid/points)")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid {key}: needs at least one value")
    both = sorted(set(grid) & set(sets))
    if both:
        raise SweepError(f"{', '.join(both)}: both set for every point and swept in the grid; give it once")
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    bases = explicit or [{}]
    width = len(str(len(bases) * len(combos)))
    given_points: list[Point] = []
    for i, (base, combo) in enumerate(itertools.product(bases, combos), start=1):
        base = dict(base)
        given = str(base.pop("name", ""))
        suffix = f"-{(i - 1) % len(combos) + 1}" if len(combos) > 1 else ""
        name = f"{given}{suffix}" if given else f"p{i:0{width}d}"
        clash = sorted(set(base) & set(combo))
        if clash:
            raise SweepError(f"point {name}: {', '.join(clash)} both in the point and in the grid")
        given_points.append(Point(name, {**base, **combo}))
    swept = list(dict.fromkeys(k for p in given_points for k in p.settings))
    out: list[Point] = []
    configs: list[str] = []  # each point's whole validated config: 3 and 3.0 are the same epochs
    for p in given_points:
        try:
            cfg = load_profile(profile, {**sets, **p.settings}).model_dump(mode="json")
        except GlyphError as exc:
            raise SweepError(f"point {p.name} ({p.label(swept)}): {exc}") from None
        out.append(Point(p.name, {k: _dotted(cfg, k) for k in swept}))  # as validated: 3 -> 3.0 epochs
        configs.append(canonical_json(cfg))
    for (a, ca), (b, cb) in itertools.combinations(zip(out, configs, strict=True), 2):
        if a.name == b.name:
            raise SweepError(f"two points are named {a.name!r}")
        if ca == cb:
            raise SweepError(f"points {a.name} and {b.name} run with the same settings")
    return SweepPlan(profile=profile, sets=sets, grid=grid, explicit=explicit, points=out)


# ---------------------------------------------------------------------------------------------
# the record: what the sweep ran and what came of each point


def point_outcome(
    point: Point,
    *,
    state: str,
    flow_run_id: str | None = None,
    flow_run_name: str | None = None,
    summary: dict[str, Any] | None = None,
    error: str | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """One point in the record: its settings, how its pipeline run ended, what each stage did
    (ran or Cached, seconds) and where its metrics are."""
    stages = (summary or {}).get("stages") or []
    evaluate = next((s for s in stages if s["stage"] == "evaluate"), None)
    metrics = store.uri("evaluate", evaluate["key"], "metrics.json") if evaluate and store else None
    return {
        "name": point.name,
        "settings": point.settings,
        "state": state,
        "error": error,
        "flow_run_id": flow_run_id,
        "flow_run_name": flow_run_name,
        "seconds": (summary or {}).get("seconds"),
        "stages": [
            {"stage": s["stage"], "cached": s["cached"], "seconds": s["seconds"], "key": s["key"]}
            for s in stages
        ],
        "metrics": metrics,
    }


def sweep_record(
    plan: SweepPlan,
    outcomes: list[dict[str, Any]],
    *,
    sweep_id: str,
    name: str | None,
    store: str,
    refresh: list[str] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    return {
        "kind": "glyph-sweep",
        "version": RECORD_VERSION,
        "id": sweep_id,
        "name": name,
        "store": store,
        "profile": plan.profile,
        "set": plan.sets,
        "grid": plan.grid,
        "explicit_points": plan.explicit,
        "swept": plan.swept,
        "refresh": refresh or [],
        "command": command,
        "points": outcomes,
    }


def record_uri(store: Store, sweep_id: str) -> str:
    return store.uri(SWEEP_DIR, sweep_id, RECORD)


def save_sweep(store: Store, record: dict[str, Any], files: Mapping[str, bytes] | None = None) -> str:
    """Publish the record (and rendered files beside it) under `{store}/_sweeps/{id}/`, with a
    pointer by flow-run name and `last`, so `glyph report --sweep` finds it by id, name or `last`."""
    sid = record["id"]
    for fname, data in (files or {}).items():
        store.publish_bytes(store.uri(SWEEP_DIR, sid, fname), data)
    uri = record_uri(store, sid)
    store.publish_bytes(uri, json.dumps(record, indent=2, default=str).encode())
    pointer = json.dumps({"id": sid}).encode()
    if record.get("name"):
        store.publish_bytes(store.uri(SWEEP_DIR, "by-name", f"{record['name']}.json"), pointer)
    store.publish_bytes(store.uri(SWEEP_DIR, "last.json"), pointer)
    return uri


def _read_json(store: Store, uri: str) -> Any:
    try:
        return json.loads(store.read_bytes(uri))
    except StorageError:
        return None


def find_sweep(ref: str, store: Store) -> tuple[dict[str, Any], str | None]:
    """The record named by `ref`: a folder holding `sweep.json` (a copy a study kept), or in the
    store a sweep flow-run id, a flow-run name, or `last`. Returns (record, folder or None)."""
    folder = Path(ref)
    if (folder / RECORD).is_file():
        return json.loads((folder / RECORD).read_text()), str(folder)
    sid = ref
    if ref == "last" or not store.exists(record_uri(store, ref)):
        pointer_uri = (
            store.uri(SWEEP_DIR, "last.json")
            if ref == "last"
            else store.uri(SWEEP_DIR, "by-name", f"{ref}.json")
        )
        pointer = _read_json(store, pointer_uri)
        if not pointer:
            raise SweepError(
                f"no sweep {ref!r}: not a folder with {RECORD}, nor a sweep id, name or `last` in {store.root}"
            )
        sid = pointer["id"]
    record = _read_json(store, record_uri(store, sid))
    if record is None:
        raise SweepError(f"sweep {ref!r}: its record {record_uri(store, sid)} is missing")
    return record, None


def point_metrics_path(folder: str | Path, point: str) -> Path:
    return Path(folder) / "points" / point / "metrics.json"


def load_metrics(record: dict[str, Any], store: Store, folder: str | None = None) -> dict[str, Any]:
    """`{point name: metrics JSON}` of the completed points: from the store, or from the copies
    in a kept folder."""
    out: dict[str, Any] = {}
    for p in record["points"]:
        if p["state"] != "completed":
            continue
        if folder is not None:
            path = point_metrics_path(folder, p["name"])
            if path.is_file():
                out[p["name"]] = json.loads(path.read_text())
        elif p.get("metrics"):
            metrics = _read_json(store, p["metrics"])
            if metrics is not None:
                out[p["name"]] = metrics
    return out


# ---------------------------------------------------------------------------------------------
# the comparison


def _get(d: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def point_row(point: dict[str, Any], metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers a sweep compares, picked out of one point's metrics.json (tuned model unless
    the name says base): nothing is recomputed."""
    row: dict[str, Any] = {"point": point["name"], "state": point["state"], **point["settings"]}
    if metrics is None:
        row["error"] = point.get("error") or "no metrics"
        return row
    tuned = _get(metrics, "models", TUNED_LABEL) or {}
    base = _get(metrics, "models", BASE_LABEL) or {}
    within = _get(tuned, "selectivity", "within_source") or {}
    row["n_problems"] = metrics.get("n_problems")
    for b in BUCKETS:
        st = _get(tuned, "by_bucket", b) or {}
        row[f"emergence_{b}"] = {
            k: st.get(f"emergence{s}") for k, s in (("rate", ""), ("lo", "_lo"), ("hi", "_hi"))
        }
        row[f"emergence_{b}"]["n"] = st.get("n")
    row["auroc"] = within.get("auroc")
    row["hard_minus_easy"] = within.get("hard_minus_easy")
    row["math_auroc"] = _get(within, "by_source", "math", "auroc")
    row["math_1_2"] = _get(tuned, "math_levels", "1-2", "glyph_use")
    row["math_4_5"] = _get(tuned, "math_levels", "4-5", "glyph_use")
    overall = tuned.get("overall") or {}
    for k in ("valid", "accuracy", "truncated"):
        row[k] = {"rate": overall.get(k), "lo": overall.get(f"{k}_lo"), "hi": overall.get(f"{k}_hi")}
    b_overall = base.get("overall") or {}
    row["base_accuracy"] = {
        "rate": b_overall.get("accuracy"),
        "lo": b_overall.get("accuracy_lo"),
        "hi": b_overall.get("accuracy_hi"),
    }
    row["goal_met"] = _get(tuned, "study_goal", "met")
    row["warnings"] = metrics.get("warnings", [])
    return row


def _value(x: Any) -> float | None:
    v = x.get("value", x.get("rate")) if isinstance(x, dict) else x
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def eligible(row: dict[str, Any]) -> bool:
    """Can be the best point: tuned accuracy not below base accuracy (the point estimates, both
    known) and a defined within-source AUROC (the model both uses and skips glyphs in a source)."""
    tuned, base = _value(row.get("accuracy")), _value(row.get("base_accuracy"))
    return tuned is not None and base is not None and tuned >= base and _value(row.get("auroc")) is not None


def _rank(r: dict[str, Any]) -> tuple[Any, ...]:
    auroc, easy = _value(r.get("auroc")), _value(r.get("math_1_2"))
    return (
        r.get("goal_met") is not True,
        auroc is None,
        -(auroc or 0.0),
        easy if easy is not None else 2.0,
        r["point"],
    )


def best_point(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best point by :data:`BEST_RULE`: `{"point", "rule", "why", "eligible", "top_by_auroc"}`;
    `point` is None when no point qualifies, and `top_by_auroc` then names the one the rule
    would pick if accuracy did not count."""
    done = [r for r in rows if "error" not in r]
    ok = sorted((r for r in done if eligible(r)), key=_rank)
    top = [r for r in sorted(done, key=_rank) if _value(r.get("auroc")) is not None]
    out: dict[str, Any] = {
        "rule": BEST_RULE,
        "eligible": [r["point"] for r in ok],
        "top_by_auroc": top[0]["point"] if top else None,
    }
    if not ok:
        out["point"] = None
        if not done:
            out["why"] = "no point completed, so there is nothing to compare"
        elif not top:
            out["why"] = "no completed point has a defined within-source AUROC (glyphs always or never)"
        else:
            out["why"] = "no completed point keeps the base model's accuracy"
        return out
    best = ok[0]
    out["point"] = best["point"]
    out["why"] = (
        f"within-source AUROC {fmt_estimate(best.get('auroc'))}, MATH levels 1–2 glyph use "
        f"{_pct(best.get('math_1_2'))}, levels 4–5 {_pct(best.get('math_4_5'))}, accuracy "
        f"{_pct(best.get('accuracy'))} (base {_pct(best.get('base_accuracy'))}); study goal "
        f"{ {True: 'met', False: 'not met', None: 'undecided'}[best.get('goal_met')] }"
    )
    return out


def _pct(x: Any) -> str:
    if not isinstance(x, dict):
        return "–"
    return fmt_rate(x.get("rate"), x.get("lo"), x.get("hi"))


def comparison(
    record: dict[str, Any], metrics: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one row per point, in the plan's order; the best point and its rule)."""
    rows = [point_row(p, metrics.get(p["name"])) for p in record["points"]]
    return rows, best_point(rows)


def comparison_markdown(
    record: dict[str, Any], rows: list[dict[str, Any]], best: dict[str, Any], plot_ref: str | None = None
) -> str:
    """The sweep's report: what was swept, the table over the points, the best point and its
    rule, the plot, the failed points."""
    swept = record.get("swept") or []
    done = [r for r in rows if "error" not in r]
    n = sorted({int(r["n_problems"]) for r in done if r.get("n_problems") is not None})
    title = (
        f"Sweep `{record.get('name') or record['id']}`: {len(rows)} points on profile `{record['profile']}`"
    )
    lines = [f"## {title}", ""]
    if record.get("set"):
        lines += ["Every point: " + ", ".join(f"`{k}={_show(v)}`" for k, v in record["set"].items()), ""]
    if record.get("command"):
        lines += ["```", record["command"], "```", ""]
    lines += [
        "Tuned model on "
        + (f"{', '.join(str(x) for x in n)} held-out problems" if n else "held-out problems")
        + " (the points' own evaluations; rates with 95 % Wilson intervals, selectivity with 95 % "
        "bootstrap intervals). Emergence: any glyph; AUROC: glyph use against difficulty within "
        "each source (the headline); MATH L1–2 / L4–5: glyph use on MATH levels 1–2 and 4–5, where "
        f"the study's goal asks ≤ {100 * STUDY_GOAL['glyph_use_levels_1_2_max']:.0f} % and "
        f"≥ {100 * STUDY_GOAL['glyph_use_levels_4_5_min']:.0f} % (and MATH AUROC "
        f"≥ {STUDY_GOAL['auroc_min']:.2f}).",
        "",
    ]
    head = [
        "point",
        *swept,
        "emergence easy",
        "medium",
        "hard",
        "within-source AUROC",
        "hard − easy",
        "MATH L1–2",
        "MATH L4–5",
        "MATH AUROC",
        "valid",
        "accuracy",
        "base accuracy",
        "truncated",
        "goal",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = " **(best)**" if r["point"] == best.get("point") else ""
        cells = [f"{r['point']}{mark}", *(_show(r[k]) if k in r else "" for k in swept)]
        if "error" in r:
            cells += [f"failed: {_short(r['error'])}"] + [""] * (len(head) - len(cells) - 1)
        else:
            cells += [
                *(_pct(r[f"emergence_{b}"]) for b in BUCKETS),
                fmt_estimate(r.get("auroc")),
                fmt_estimate(r.get("hard_minus_easy"), signed=True),
                _pct(r.get("math_1_2")),
                _pct(r.get("math_4_5")),
                fmt_estimate(r.get("math_auroc")),
                _pct(r.get("valid")),
                _pct(r.get("accuracy")),
                _pct(r.get("base_accuracy")),
                _pct(r.get("truncated")),
                {True: "met", False: "–", None: "?"}[r.get("goal_met")],
            ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", f"**{BEST_RULE}**", ""]
    if best.get("point"):
        lines.append(f"Best point: **{best['point']}** — {best['why']}.")
    else:
        lines.append(f"Best point: none — {best['why']}.")
        if best.get("top_by_auroc"):
            lines.append(f"(The rule without the accuracy condition would pick {best['top_by_auroc']}.)")
    warned = [r["point"] for r in done if r.get("warnings")]
    if warned:
        lines += ["", f"Truncation warnings (see each point's report): {', '.join(warned)}."]
    if plot_ref:
        lines += ["", f"![Frontier: glyph use on easy against hard problems]({plot_ref})"]
    failed = [p for p in record["points"] if p["state"] != "completed"]
    if failed:
        lines += ["", "Failed points (a rerun of the sweep recomputes only what failed):", ""]
        lines += [f"- {p['name']}: {p.get('error') or p['state']}" for p in failed]
    return "\n".join(lines) + "\n"


def _short(text: str, n: int = 80) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= n else line[: n - 1] + "…"


def table_rows(rows: list[dict[str, Any]], swept: list[str]) -> list[dict[str, Any]]:
    """Flat rows (numbers, not strings) for a table artifact."""
    flat = []
    for r in rows:
        out: dict[str, Any] = {"point": r["point"], **{k: r.get(k) for k in swept}, "state": r["state"]}
        if "error" not in r:
            for b in BUCKETS:
                out[f"emergence_{b}"] = _value(r[f"emergence_{b}"])
            out["auroc_within"] = _value(r.get("auroc"))
            out["auroc_lo"] = _get(r, "auroc", "lo")
            out["auroc_hi"] = _get(r, "auroc", "hi")
            out["hard_minus_easy"] = _value(r.get("hard_minus_easy"))
            out["math_l1_2"] = _value(r.get("math_1_2"))
            out["math_l4_5"] = _value(r.get("math_4_5"))
            for k in ("valid", "accuracy", "base_accuracy", "truncated"):
                out[k] = _value(r.get(k))
            out["goal_met"] = r.get("goal_met")
        flat.append({k: (_show(v) if isinstance(v, dict | list) else v) for k, v in out.items()})
    return flat


# ---------------------------------------------------------------------------------------------
# the frontier


def frontier_png(rows: list[dict[str, Any]], best: str | None = None) -> bytes:
    """Glyph use on easy against hard problems, one marker per point, accuracy as colour: within
    MATH (levels 1–2 against 4–5, the study's goal region shaded) and over all sources (easy
    against hard bucket). 95 % Wilson error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    done = [r for r in rows if "error" not in r]
    acc = [_value(r.get("accuracy")) or 0.0 for r in done]
    vmax = max([0.05, *acc])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    panels = (
        (
            axes[0],
            "math_1_2",
            "math_4_5",
            "Within MATH",
            "glyph use, MATH levels 1–2",
            "glyph use, MATH levels 4–5",
        ),
        (
            axes[1],
            "emergence_easy",
            "emergence_hard",
            "All sources",
            "glyph use, easy bucket",
            "glyph use, hard bucket",
        ),
    )
    scatter = None
    for ax, xk, yk, title, xl, yl in panels:
        if xk == "math_1_2":
            lo, hi = STUDY_GOAL["glyph_use_levels_1_2_max"], STUDY_GOAL["glyph_use_levels_4_5_min"]
            ax.add_patch(Rectangle((0, hi), lo, 1.05 - hi, color="tab:green", alpha=0.15, label="study goal"))
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="no selectivity")
        for r, a in zip(done, acc, strict=True):
            x, y = r.get(xk) or {}, r.get(yk) or {}
            xv, yv = _value(x), _value(y)
            if xv is None or yv is None:
                continue
            ax.errorbar(
                xv,
                yv,
                xerr=[[max(0.0, xv - (x.get("lo") or xv))], [max(0.0, (x.get("hi") or xv) - xv)]],
                yerr=[[max(0.0, yv - (y.get("lo") or yv))], [max(0.0, (y.get("hi") or yv) - yv)]],
                fmt="none",
                ecolor="lightgrey",
                zorder=1,
            )
            scatter = ax.scatter(
                [xv],
                [yv],
                c=[a],
                cmap="viridis",
                vmin=0,
                vmax=vmax,
                s=140 if r["point"] == best else 60,
                edgecolors="red" if r["point"] == best else "black",
                linewidths=2 if r["point"] == best else 0.5,
                zorder=2,
            )
            ax.annotate(r["point"], (xv, yv), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
    if scatter is not None:
        fig.colorbar(scatter, ax=axes, label="tuned accuracy (all held-out problems)", shrink=0.9)
    fig.suptitle("Sweep frontier: glyph use on hard against easy problems (red edge: best point)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# a folder a study keeps


def write_folder(
    out: str | Path,
    record: dict[str, Any],
    metrics: Mapping[str, Any],
    markdown: str,
    png: bytes,
) -> Path:
    """`sweep.json`, `table.md` (with the plot linked), `frontier.png`, `command.txt` and each
    completed point's `points/<name>/metrics.json`: enough for `glyph report --sweep <folder>`
    to render it again without the store."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD).write_text(json.dumps(record, indent=2, default=str))
    (folder / "table.md").write_text(markdown)
    (folder / "frontier.png").write_bytes(png)
    if record.get("command"):
        (folder / "command.txt").write_text(record["command"] + "\n")
    for name, m in metrics.items():
        path = point_metrics_path(folder, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(m, indent=1))
    return folder


def render(
    record: dict[str, Any], metrics: Mapping[str, Any]
) -> tuple[str, bytes, list[dict[str, Any]], dict[str, Any]]:
    """(markdown with the plot linked as `frontier.png`, the plot, the rows, the best point)."""
    rows, best = comparison(record, metrics)
    png = frontier_png(rows, best.get("point"))
    return comparison_markdown(record, rows, best, "frontier.png"), png, rows, best
