"""`glyph sweep` and `glyph report --sweep` from the command line: a bad sweep fails before
Prefect starts with one `error:` line, and a kept folder renders again without the store (the
flow itself: tests/test_sweep_flow.py)."""

from __future__ import annotations

from pathlib import Path

from test_sweep import SELECTIVE, TINY, _metrics
from typer.testing import CliRunner

from glyph_cli.main import app
from glyph_core.storage import Store
from glyph_core.sweep import plan_sweep, point_outcome, save_sweep, sweep_record, write_folder

runner = CliRunner(env={"COLUMNS": "200"})


def test_a_bad_point_fails_before_prefect_starts(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = runner.invoke(
        app,
        ["sweep", "--store", str(store), "--no-server", "--grid", "train.learning_rate=0.001,-1"],
    )
    assert result.exit_code == 2
    assert "error: point p2 (learning_rate=-1): train.learning_rate=-1: must be > 0" in result.output
    assert not store.exists()  # nothing ran, nothing was written
    result = runner.invoke(app, ["sweep", "--no-server", "--set", f"unify.data_dir={tmp_path}"])
    assert result.exit_code == 2 and "nothing to sweep" in result.output
    result = runner.invoke(app, ["sweep", "--no-server", "--file", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml" in result.output


def _kept(tmp_path: Path) -> tuple[Store, Path]:
    store = Store(tmp_path / "store").ensure()
    plan = plan_sweep("tiny", TINY, {"train.seed": [1, 2]})
    metrics = {"p1": _metrics(SELECTIVE, tuned_correct=0.3, base_correct=0.05)}
    outcomes = [
        point_outcome(plan.points[0], state="completed"),
        point_outcome(plan.points[1], state="failed", error="GlyphError: boom"),
    ]
    record = sweep_record(plan, outcomes, sweep_id="id-7", name="calm-heron", store=store.root)
    save_sweep(store, record)
    return store, write_folder(tmp_path / "kept", record, metrics, "# old", b"png")


def test_report_renders_a_kept_folder_again(tmp_path: Path) -> None:
    store, kept = _kept(tmp_path)
    result = runner.invoke(app, ["report", "--sweep", str(kept), "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert "## Sweep `calm-heron`: 2 points on profile `tiny`" in result.output
    assert "| p1 **(best)** | 1 |" in result.output and "| p2 | 2 | failed: GlyphError: boom" in result.output
    again = tmp_path / "again"
    assert (again / "frontier.png").read_bytes().startswith(b"\x89PNG")
    assert (again / "points" / "p1" / "metrics.json").is_file()
    assert "Best point: **p1**" in (again / "table.md").read_text()


def test_report_finds_a_sweep_in_the_store_or_says_it_cannot(tmp_path: Path) -> None:
    store, _ = _kept(tmp_path)
    by_name = runner.invoke(app, ["report", "--store", store.root, "--sweep", "calm-heron"])
    assert by_name.exit_code == 1  # p1's metrics are not in this store: said, not hidden
    assert "## Sweep `calm-heron`" in by_name.output
    assert "error: metrics of completed point(s) p1 not found" in by_name.output
    missing = runner.invoke(app, ["report", "--store", store.root, "--sweep", "no-such-sweep"])
    assert missing.exit_code == 1 and "error: no sweep 'no-such-sweep'" in missing.output
