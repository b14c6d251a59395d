from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from glyph_cli import stage_commands
from glyph_core.glyphs import format_trace

runner = CliRunner(env={"COLUMNS": "200"})  # rich wraps long option names in narrow help


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    stage_commands.register(app)
    return app


def test_help(app: typer.Typer) -> None:
    for cmd, needle in (
        ("unify", "--data-dir"),
        ("filter", "--max-completion-tokens"),
        ("rewrite", "--natural-ratio"),
    ):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0, res.output
        assert needle in res.output


def test_unify_filter_rewrite_chain(app: typer.Typer, tiny_data_dir: Path, tmp_path: Path) -> None:
    problems = tmp_path / "problems.parquet"
    store = ["--store", str(tmp_path / "store")]
    res = runner.invoke(
        app, ["unify", "--data-dir", str(tiny_data_dir), "-o", str(tmp_path), "--svamp-holdout", "10", *store]
    )
    assert res.exit_code == 0, res.output
    p = pq.read_table(problems)
    assert p.num_rows == 20 + 20 + 60 + 30 + 30 and "dropped" in res.output

    train = p.filter(pc.equal(p["split"], "train")).to_pylist()
    rows = [
        {
            "id": r["id"],
            "sample": 0,
            "prompt": "x",
            "completion": format_trace("g", "p", ["s"], "t", r["answer"]),
            "finish_reason": "stop",
            "prompt_tokens": 1,
            "completion_tokens": 10,
            "teacher": "t",
        }
        for r in train
    ]
    rows[0]["completion"] = rows[0]["completion"] + "9"  # wrong answer
    traces = tmp_path / "traces.parquet"
    pq.write_table(pa.Table.from_pylist(rows), traces)
    out = tmp_path / "filtered"
    kept, drops = out / "kept.parquet", out / "drops.parquet"
    res = runner.invoke(
        app,
        [
            "filter",
            "--traces",
            str(traces),
            "--problems",
            str(problems),
            "-o",
            str(out),
            "--workers",
            "1",
            *store,
        ],
    )
    assert res.exit_code == 0, res.output
    assert pq.read_table(kept).num_rows == len(rows) - 1
    d = dict(zip(*pq.read_table(drops).to_pydict().values(), strict=True))
    assert d["wrong_answer"] == 1 and set(d) == {
        "truncated",
        "too_long",
        "bad_structure",
        "wrong_answer",
        "duplicate",
    }

    sft = tmp_path / "sft.parquet"
    res = runner.invoke(
        app,
        [
            "rewrite",
            "--kept",
            str(kept),
            "--problems",
            str(problems),
            "-o",
            str(tmp_path),
            "--glyph-min-bucket",
            "medium",
            "--natural-ratio",
            "1",
            *store,
        ],
    )
    assert res.exit_code == 0, res.output
    kinds = pq.read_table(sft)["kind"].to_pylist()
    assert kinds.count("glyph") > 0 and kinds.count("natural") == kinds.count("glyph")


def test_failing_unify_keeps_existing_output(app: typer.Typer, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "problems.parquet"
    out.write_bytes(b"previous good output")
    with open(tiny_data_dir / "math" / "test.jsonl", "a", encoding="utf-8") as fh:
        fh.write("{broken\n")
    store = str(tiny_data_dir.parent / "store")
    res = runner.invoke(
        app, ["unify", "--data-dir", str(tiny_data_dir), "-o", str(tmp_path), "--store", store]
    )
    assert res.exit_code == 1
    assert "test.jsonl" in res.output and "line 31" in res.output
    assert out.read_bytes() == b"previous good output"
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no temp debris


def test_bad_config_and_missing_inputs(app: typer.Typer, tiny_data_dir: Path, tmp_path: Path) -> None:
    store = ["--store", str(tmp_path / "store")]
    res = runner.invoke(
        app, ["unify", "--data-dir", str(tiny_data_dir), "-o", str(tmp_path), "--sources", "aime", *store]
    )
    assert res.exit_code != 0 and "aime" in res.output
    res = runner.invoke(
        app, ["filter", "--traces", str(tmp_path / "none.parquet"), "--problems", str(tmp_path / "x"), *store]
    )
    assert res.exit_code == 1 and "none.parquet" in res.output
    assert not (tmp_path / "problems.parquet").exists()
