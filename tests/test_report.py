"""`glyph report`, without Prefect or a model.

The evaluate artifacts are built by the real scoring and aggregation code (`score_rows`,
`report`) from hand-written completions, stored the way `evaluate_refs` stores them; the run's
summary is saved by the same function the pipeline flow uses. So the report reads exactly what
a run leaves behind, in about a second. Finding a run through the Prefect API is tested with
a real pipeline run in tests/test_ui_pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from glyph_cli import run_summary
from glyph_cli.main import app
from glyph_core.eval_report import headline_lines, markdown_report, markdown_table
from glyph_core.evaluate import report, score_rows
from glyph_core.reports import save_summary
from glyph_core.storage import Store

GLYPH = "🜞 Add the parts.\n🜆 Sum them.\n🜂 2 + 2 = 4\n🜃 The total is 4.\n🝞 4"
KEY = "0123456789abcdef01234567"


def _completion(text: str) -> SimpleNamespace:
    return SimpleNamespace(
        text=text, finish_reason="stop", prompt_tokens=20, completion_tokens=len(text.split()), error=None
    )


def _problems() -> list[dict[str, Any]]:
    rows = []
    for i, (bucket, difficulty) in enumerate([("easy", 1.0), ("easy", 1.0), ("hard", 5.0), ("hard", 5.0)]):
        rows.append(
            {"id": f"p{i}", "source": "gsm8k", "bucket": bucket, "difficulty": difficulty, "answer": "4"}
        )
    return rows


def _fake_run(root: Path) -> dict[str, Any]:
    """A store with one evaluate stage's artifacts and the summary `glyph run` would save."""
    st = Store(root).ensure()
    rows = _problems()
    base = score_rows(rows, [_completion("The answer is 4.")] * 4, "base")
    # Tuned: glyphs on both hard problems, none on the easy ones.
    tuned = score_rows(
        rows, [_completion("It is 4."), _completion("4"), _completion(GLYPH), _completion(GLYPH)], "tuned"
    )
    import pyarrow as pa

    result = report(pa.concat_tables([base, tuned]), {"n_problems": 4})
    table_ref = st.write_table(result.table, "evaluate", KEY, "table.parquet")
    st.write_json(result.metrics, "evaluate", KEY, "metrics.json")
    st.publish_bytes(st.uri("evaluate", KEY, "emergence_accuracy.png"), result.plot_png)
    stages = [
        {
            "stage": "evaluate",
            "cached": False,
            "seconds": 1.5,
            "stage_seconds": 1.4,
            "overhead_seconds": 0.1,
            "key": KEY,
            "uri": table_ref.uri,
            "refs": {"table": table_ref.uri},
            "rows_in": 4,
            "rows_out": 8,
            "drops": {},
        }
    ]
    summary: dict[str, Any] = {
        "profile": "tiny",
        "store": st.root,
        "seconds": 2.0,
        "stages": stages,
        "flow_run": {
            "id": "fdafed6f-0000-0000-0000-000000000000",
            "name": "happy-run",
            "server": "http://127.0.0.1:4200",
            "ui_url": "http://127.0.0.1:4200/runs/flow-run/fdafed6f-0000-0000-0000-000000000000",
        },
    }
    summary["last_run"] = save_summary(st, summary)
    summary["_table_md"] = markdown_table(result.table)
    summary["_metrics"] = result.metrics
    return summary


def test_evaluation_block_reads_what_evaluate_wrote(tmp_path: Path) -> None:
    summary = _fake_run(tmp_path / "store")
    ev = run_summary.evaluation_block(summary)
    assert ev is not None
    assert ev["metrics"] == json.loads(json.dumps(summary["_metrics"]))
    tuned_hard = next(r for r in ev["rows"] if r["model"] == "tuned" and r["group"] == "hard")
    assert tuned_hard["emergence"] == 1.0 and tuned_hard["valid"] == 1.0
    assert ev["plot"].endswith("emergence_accuracy.png")
    saved = Path(summary["last_run"])
    assert saved == Path(summary["store"]) / "_runs" / summary["flow_run"]["id"] / "summary.json"
    assert json.loads(saved.read_text())["stages"] == summary["stages"]
    assert json.loads((saved.parents[1] / "last.json").read_text()) == json.loads(saved.read_text())
    assert not list(saved.parent.glob(".*tmp*")), "published atomically, no temp left"


def test_report_prints_tables_and_writes_markdown_with_plot(tmp_path: Path) -> None:
    summary = _fake_run(tmp_path / "store")
    result = CliRunner().invoke(app, ["report", "--store", summary["store"]], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "glyph emergence" in out and "tuned" in out and "hard" in out
    assert "100.0% [" in out  # tuned emergence on hard, with its interval
    for line in headline_lines(summary["_metrics"]):  # the same headline as the UI's artifact
        assert line.split(";")[0] in out
    assert "emergence_accuracy.png" in out
    assert "happy-run" in out and "/runs/flow-run/fdafed6f" in out
    md_path = Path(summary["last_run"]).with_name("report.md")
    md = md_path.read_text()
    assert markdown_report(summary["_metrics"], original_study=True).strip() in md
    assert "![Glyph emergence and accuracy by bucket](report_emergence_accuracy.png)" in md
    png = md_path.with_name("report_emergence_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG")


@pytest.mark.parametrize("by", ["id", "name"])
def test_report_finds_a_run_in_the_store_by_id_or_name(tmp_path: Path, by: str) -> None:
    summary = _fake_run(tmp_path / "store")
    newer = {**summary, "flow_run": {"id": "0e4d1c2b-0000-0000-0000-000000000001", "name": "other-run"}}
    newer["stages"] = [{**summary["stages"][0], "rows_in": 99}]
    save_summary(Store(summary["store"]), {k: v for k, v in newer.items() if not k.startswith("_")})
    run = summary["flow_run"][by]
    result = CliRunner().invoke(app, ["report", run, "--store", summary["store"]], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "4 → 8" in result.output and "99 →" not in result.output  # that run, not the newest


def test_report_out_option(tmp_path: Path) -> None:
    summary = _fake_run(tmp_path / "store")
    out = tmp_path / "elsewhere" / "demo.md"
    result = CliRunner().invoke(app, ["report", "--store", summary["store"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "](demo_emergence_accuracy.png)" in out.read_text()
    assert (out.parent / "demo_emergence_accuracy.png").exists()


def test_report_without_a_run_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", "--store", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert "no run recorded" in result.output and "glyph report <id or name>" in result.output
