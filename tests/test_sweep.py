"""The sweep without Prefect (glyph_core/sweep.py): the plan from a grid, a file and `--set`;
the rows picked out of real metrics JSON (built by glyph_core.metrics from scored completions);
the best-point rule; the record in a store and in a kept folder; the table and the plot.

The sweep flow itself (points as child runs, shared stages, failures, reruns) is in
tests/test_sweep_flow.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from glyph_core.evaluate import COMPLETION_SCHEMA
from glyph_core.metrics import aggregate, build_metrics
from glyph_core.storage import Store
from glyph_core.sweep import (
    BEST_RULE,
    Point,
    SweepError,
    best_point,
    comparison,
    comparison_markdown,
    find_sweep,
    frontier_png,
    load_metrics,
    load_spec,
    parse_grid,
    plan_sweep,
    point_outcome,
    point_row,
    save_sweep,
    sweep_record,
    table_rows,
    write_folder,
)
from tests.scored_rows import scored_row

TINY = {"unify.data_dir": "/nonexistent", "unify.svamp_holdout": 10}


# ---------------------------------------------------------------------------------------------
# the plan


def test_parse_grid_values_as_set_parses_them() -> None:
    assert parse_grid(
        ["rewrite.natural_ratio=0.5,1,2", "train.epochs=[3, 6]", "rewrite.glyph_min_bucket=medium,hard"]
    ) == {
        "rewrite.natural_ratio": [0.5, 1, 2],
        "train.epochs": [3, 6],
        "rewrite.glyph_min_bucket": ["medium", "hard"],
    }
    assert parse_grid(['rewrite.glyph_min_bucket_by_source=[{"math": "hard"}, {}]']) == {
        "rewrite.glyph_min_bucket_by_source": [{"math": "hard"}, {}]
    }
    for bad in ("train.epochs", "=1,2", "train.epochs="):
        with pytest.raises(SweepError, match="--grid expects"):
            parse_grid([bad])
    with pytest.raises(SweepError, match="twice"):
        parse_grid(["train.epochs=1", "train.epochs=2"])


def test_a_grid_of_two_by_two_is_four_validated_points() -> None:
    plan = plan_sweep("tiny", TINY, {"rewrite.natural_ratio": [0.5, 1], "train.epochs": [3, 6]})
    assert [(p.name, p.settings) for p in plan.points] == [
        ("p1", {"rewrite.natural_ratio": 0.5, "train.epochs": 3}),
        ("p2", {"rewrite.natural_ratio": 0.5, "train.epochs": 6}),
        ("p3", {"rewrite.natural_ratio": 1, "train.epochs": 3}),
        ("p4", {"rewrite.natural_ratio": 1, "train.epochs": 6}),
    ]
    assert plan.swept == ["rewrite.natural_ratio", "train.epochs"]
    assert plan.overrides(plan.points[3]) == {**TINY, "rewrite.natural_ratio": 1, "train.epochs": 6}
    assert plan.points[3].label(plan.swept) == "natural_ratio=1.0 epochs=6.0"  # as validated


def test_explicit_points_are_combined_with_the_grid_and_keep_their_names() -> None:
    points = [
        {"name": "pooled", "rewrite.natural_balance": "pooled"},
        {"rewrite.natural_balance": "per_source"},
    ]
    plan = plan_sweep("tiny", TINY, {"train.learning_rate": [1e-3, 2e-3]}, points)
    assert [(p.name, p.settings) for p in plan.points] == [
        ("pooled-1", {"rewrite.natural_balance": "pooled", "train.learning_rate": 1e-3}),
        ("pooled-2", {"rewrite.natural_balance": "pooled", "train.learning_rate": 2e-3}),
        ("p3", {"rewrite.natural_balance": "per_source", "train.learning_rate": 1e-3}),
        ("p4", {"rewrite.natural_balance": "per_source", "train.learning_rate": 2e-3}),
    ]


def test_point_names_must_be_unique() -> None:
    with pytest.raises(SweepError, match="named 'a'"):
        plan_sweep("tiny", TINY, None, [{"name": "a", "train.seed": 1}, {"name": "a", "train.seed": 2}])


def test_explicit_points_alone_and_their_names() -> None:
    points = [
        {"name": "recipe0", "rewrite.glyph_min_bucket": "medium"},
        {"rewrite.glyph_min_bucket": "hard", "rewrite.natural_balance": "per_source"},
    ]
    plan = plan_sweep("tiny", TINY, None, points)
    assert [p.name for p in plan.points] == ["recipe0", "p2"]
    assert plan.swept == ["rewrite.glyph_min_bucket", "rewrite.natural_balance"]
    # every point states every swept setting: recipe0 runs with the profile's natural_balance
    assert plan.points[0].settings == {
        "rewrite.glyph_min_bucket": "medium",
        "rewrite.natural_balance": "pooled",
    }
    assert plan.points[0].label(plan.swept) == "glyph_min_bucket=medium natural_balance=pooled"
    with_grid = plan_sweep("tiny", TINY, {"train.epochs": [3, 6]}, points)
    assert [p.settings for p in with_grid.points][1] == {
        "rewrite.glyph_min_bucket": "medium",
        "rewrite.natural_balance": "pooled",
        "train.epochs": 6,
    }
    assert len(with_grid.points) == 4


def test_a_point_overrides_the_common_settings_and_shows_what_it_runs_with() -> None:
    sets = {**TINY, "train.learning_rate": 1e-3, "rewrite.natural_ratio": 1.0}
    plan = plan_sweep("tiny", sets, None, [{"name": "centre"}, {"name": "slow", "train.learning_rate": 3e-4}])
    assert [p.settings for p in plan.points] == [{"train.learning_rate": 1e-3}, {"train.learning_rate": 3e-4}]
    assert plan.overrides(plan.points[1])["train.learning_rate"] == 3e-4
    assert plan.overrides(plan.points[1])["rewrite.natural_ratio"] == 1.0


def test_labels_keep_the_whole_path_where_two_settings_end_alike() -> None:
    p = Point("p1", {"rewrite.seed": 1, "train.seed": 2, "train.epochs": 3})
    assert p.label() == "rewrite.seed=1 train.seed=2 epochs=3"


@pytest.mark.parametrize(
    ("sets", "grid", "points", "message"),
    [
        ({}, {}, [], "nothing to sweep"),
        ({}, {"train.epochs": []}, [], "needs at least one value"),
        ({"train.epochs": 3}, {"train.epochs": [3, 6]}, [], "both set for every point and swept in the grid"),
        ({}, {"train.epochs": [3]}, [{"train.epochs": 6}], "both in the point and in the grid"),
        ({}, None, [{"train.seed": 1}, {"train.seed": 1}], "same settings"),
        ({"train.epochs": 3}, None, [{"train.epochs": 3}, {}], "p1 and p2 run with the same settings"),
        (
            {},
            {"train.learning_rate": [1e-3, -1]},
            [],
            r"point p2 \(learning_rate=-1\): train.learning_rate=-1: must be > 0",
        ),
        ({}, {"train.epochz": [1, 2]}, [], "point p1 .*unknown setting 'train.epochz'"),
        ({}, {"rewrite.natural_hard_fraction": [0.5, 1.0]}, [], r"point p2 .*must be < 1"),
    ],
)
def test_a_bad_sweep_fails_before_anything_runs(
    sets: dict[str, Any], grid: dict[str, list[Any]] | None, points: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(SweepError, match=message):
        plan_sweep("tiny", {**TINY, **sets}, grid, points)


def test_sweep_file(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(
        "profile: demo\n"
        "set:\n  train.epochs: 3\n"
        "grid:\n  rewrite.natural_ratio: [0.5, 1]\n"
        "points:\n  - {name: a, rewrite.glyph_min_bucket: medium}\n  - {rewrite.glyph_min_bucket: hard}\n"
    )
    spec = load_spec(path)
    assert spec.profile == "demo" and spec.set == {"train.epochs": 3}
    plan = plan_sweep(spec.profile or "tiny", {**spec.set, **TINY}, spec.grid, spec.points)
    assert [p.name for p in plan.points] == ["a-1", "a-2", "p3", "p4"]
    assert plan.points[2].settings == {"rewrite.glyph_min_bucket": "hard", "rewrite.natural_ratio": 0.5}
    for text, message in (
        ("grids:\n  train.epochs: [1]\n", "grids: unknown key"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("grid: {train.epochs: 3}\n", "grid.train.epochs: must be a valid list"),
        ("grid: [unclosed\n", "sweep file"),
    ):
        path.write_text(text)
        with pytest.raises(SweepError, match=message) as info:
            load_spec(path)
        assert str(path) in str(info.value)
    with pytest.raises(SweepError, match="No such file"):
        load_spec(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------
# rows from real metrics JSON


def _metrics(
    glyph_use: dict[int, float], tuned_correct: float = 0.2, base_correct: float = 0.1, seed: int = 0
) -> dict[str, Any]:
    """The metrics JSON of an evaluation whose tuned model writes glyphs on a share
    `glyph_use[level]` of the problems of each MATH level (and of GSM8K's step counts shifted to
    1..5), built by the real aggregation and bootstrap."""
    rng = random.Random(seed)
    rows = []
    problems = [(f"math/{lv}/{i}", "math", lv) for lv in range(1, 6) for i in range(20)]
    problems += [(f"gsm8k/{lv}/{i}", "gsm8k", lv) for lv in range(2, 7) for i in range(10)]
    for pid, source, level in problems:
        scale = level if source == "math" else level - 1
        for model, emerged, correct in (
            ("base", False, rng.random() < base_correct),
            ("tuned", rng.random() < glyph_use[scale], rng.random() < tuned_correct),
        ):
            rows.append(scored_row(model, pid, source, level, emerged, correct=correct))
    scored = pa.Table.from_pylist(rows, schema=COMPLETION_SCHEMA)
    return json.loads(
        json.dumps(
            build_metrics(
                scored, aggregate(scored), {"n_problems": len(problems)}, version="2", resamples=200
            )
        )
    )


SELECTIVE = {1: 0.0, 2: 0.05, 3: 0.5, 4: 0.95, 5: 1.0}
HABIT = {1: 0.6, 2: 0.7, 3: 0.8, 4: 0.9, 5: 0.95}


def _point(name: str, **settings: Any) -> dict[str, Any]:
    return point_outcome(Point(name, settings), state="completed")


def test_a_row_is_picked_out_of_the_metrics_json_not_recomputed() -> None:
    m = _metrics(SELECTIVE)
    row = point_row(_point("p1", **{"rewrite.natural_ratio": 1}), m)
    tuned, base = m["models"]["tuned"], m["models"]["base"]
    assert row["rewrite.natural_ratio"] == 1 and row["n_problems"] == 150
    assert row["auroc"] == tuned["selectivity"]["within_source"]["auroc"]
    assert row["hard_minus_easy"] == tuned["selectivity"]["within_source"]["hard_minus_easy"]
    assert row["math_auroc"] == tuned["selectivity"]["within_source"]["by_source"]["math"]["auroc"]
    assert row["math_1_2"] == tuned["math_levels"]["1-2"]["glyph_use"]
    assert row["math_4_5"] == tuned["math_levels"]["4-5"]["glyph_use"]
    assert row["accuracy"]["rate"] == tuned["overall"]["accuracy"]
    assert row["base_accuracy"]["rate"] == base["overall"]["accuracy"]
    assert row["emergence_hard"]["rate"] == tuned["by_bucket"]["hard"]["emergence"]
    assert row["emergence_easy"]["n"] == tuned["by_bucket"]["easy"]["n"]
    assert row["goal_met"] is tuned["study_goal"]["met"] is True
    assert row["math_1_2"]["rate"] < 0.05 and row["math_4_5"]["rate"] > 0.9
    assert row["auroc"]["lo"] < row["auroc"]["value"] < row["auroc"]["hi"]
    failed = point_row({**_point("p2"), "state": "failed", "error": "GlyphError: boom"}, None)
    assert failed["error"] == "GlyphError: boom" and "auroc" not in failed


def _row(
    name: str, auroc: float | None, acc: float, base: float, easy: float, goal: bool | None = False
) -> dict[str, Any]:
    return {
        "point": name,
        "state": "completed",
        "auroc": {"value": auroc, "lo": None, "hi": None},
        "accuracy": {"rate": acc},
        "base_accuracy": {"rate": base},
        "math_1_2": {"rate": easy},
        "math_4_5": {"rate": 0.9},
        "goal_met": goal,
    }


def test_the_best_point_rule() -> None:
    rows = [
        _row("a", 0.70, 0.05, 0.04, 0.30),
        _row("b", 0.90, 0.03, 0.04, 0.10),  # highest AUROC, but loses accuracy
        _row("c", 0.75, 0.04, 0.04, 0.40),  # accuracy equal to base: allowed
        _row("d", 0.75, 0.06, 0.04, 0.20),  # same AUROC as c, less glyph use on MATH levels 1–2
        _row("e", None, 0.09, 0.04, 0.00),  # never uses glyphs: AUROC undefined
        {"point": "f", "state": "failed", "error": "boom"},
    ]
    best = best_point(rows)
    assert best["rule"] == BEST_RULE
    assert best["point"] == "d" and best["eligible"] == ["d", "c", "a"]
    assert best["top_by_auroc"] == "b"
    rows.append(_row("g", 0.60, 0.05, 0.04, 0.15, goal=True))  # meets the study's goal: first
    assert best_point(rows)["point"] == "g"
    none = best_point([_row("b", 0.9, 0.03, 0.04, 0.1), _row("e", None, 0.1, 0.0, 0.0)])
    assert none["point"] is None and none["top_by_auroc"] == "b"
    assert "keeps the base model's accuracy" in none["why"]
    assert "defined within-source AUROC" in best_point([_row("e", None, 0.1, 0.0, 0.0)])["why"]
    assert "nothing to compare" in best_point([{"point": "f", "state": "failed", "error": "x"}])["why"]


def test_table_and_plot_from_a_record(tmp_path: Path) -> None:
    plan = plan_sweep(
        "tiny",
        TINY,
        {"rewrite.natural_balance": ["pooled", "per_source"]},
        [{"train.seed": 1}, {"train.seed": 2}],
    )
    outcomes = [point_outcome(p, state="completed") for p in plan.points[:3]]
    outcomes.append(
        point_outcome(plan.points[3], state="failed", error="GlyphError: injected failure in train")
    )
    record = sweep_record(
        plan, outcomes, sweep_id="abc", name="brave-owl", store=str(tmp_path), command="glyph sweep ..."
    )
    metrics = {
        "p1": _metrics(HABIT, seed=1),
        "p2": _metrics(SELECTIVE, seed=2),
        "p3": _metrics(SELECTIVE, tuned_correct=0.0, seed=3),
    }
    rows, best = comparison(record, metrics)
    assert [r["point"] for r in rows] == ["p1", "p2", "p3", "p4"]
    assert best["point"] == "p2"  # selective and accurate; p3 is selective but loses accuracy
    md = comparison_markdown(record, rows, best, "frontier.png")
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| point"))
    assert "| train.seed | rewrite.natural_balance |" in header
    assert any(line.startswith("| p2 **(best)** | 1 | per_source |") for line in lines)
    assert any(
        line.startswith("| p4 | 2 | per_source | failed: GlyphError: injected failure in train")
        for line in lines
    )
    assert BEST_RULE in md and "Best point: **p2**" in md and "glyph sweep ..." in md
    assert "- p4: GlyphError: injected failure in train" in md and "![Frontier" in md
    png = frontier_png(rows, best["point"])
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    flat = table_rows(rows, plan.swept)
    assert (
        flat[1]["auroc_within"]
        == metrics["p2"]["models"]["tuned"]["selectivity"]["within_source"]["auroc"]["value"]
    )
    assert flat[3] == {
        "point": "p4",
        "train.seed": 2,
        "rewrite.natural_balance": "per_source",
        "state": "failed",
    }


def test_the_record_is_found_by_id_name_last_and_kept_folder(tmp_path: Path) -> None:
    store = Store(tmp_path / "store").ensure()
    plan = plan_sweep("tiny", TINY, {"train.seed": [1, 2]})
    metrics_uri = store.write_json(_metrics(SELECTIVE), "evaluate", "k1", "metrics.json")
    outcomes = [
        point_outcome(
            plan.points[0],
            state="completed",
            summary={
                "seconds": 1.0,
                "stages": [{"stage": "evaluate", "cached": False, "seconds": 1.0, "key": "k1"}],
            },
            store=store,
        ),
        point_outcome(plan.points[1], state="failed", error="boom"),
    ]
    assert outcomes[0]["metrics"] == metrics_uri
    record = sweep_record(plan, outcomes, sweep_id="id-1", name="brave-owl", store=store.root)
    uri = save_sweep(store, record, {"table.md": b"# t"})
    assert Path(uri).is_file() and (Path(uri).parent / "table.md").read_bytes() == b"# t"
    for ref in ("id-1", "brave-owl", "last"):
        found, folder = find_sweep(ref, store)
        assert found == json.loads(json.dumps(record)) and folder is None
    metrics = load_metrics(record, store)
    assert list(metrics) == ["p1"]
    kept = write_folder(tmp_path / "kept", record, metrics, "# table", b"png")
    assert sorted(p.name for p in kept.iterdir()) == ["frontier.png", "points", "sweep.json", "table.md"]
    again, folder = find_sweep(str(kept), store)
    assert folder == str(kept) and load_metrics(again, store, folder) == metrics
    with pytest.raises(SweepError, match="no sweep 'nope'"):
        find_sweep("nope", store)
