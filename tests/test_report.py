"""`glyph report` and the on-demand Prefect server's port handling, without Prefect or a model.

The evaluate artifacts are built by the real scoring and aggregation code (`score_rows`,
`report`) from hand-written completions, stored the way `evaluate_refs` stores them; the last-run
summary is saved by the same function `glyph run` uses. So the report reads exactly what a run
leaves behind, in about a second.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from glyph_cli import run_summary
from glyph_cli import server as server_mod
from glyph_cli.main import app
from glyph_core.eval_report import markdown_table
from glyph_core.evaluate import report, score_rows
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
    summary["evaluation"] = run_summary.evaluation_block(st.root, stages)
    summary["last_run"] = run_summary.save_last(summary)
    summary["_table_md"] = markdown_table(result.table)
    return summary


def test_evaluation_block_reads_what_evaluate_wrote(tmp_path: Path) -> None:
    summary = _fake_run(tmp_path / "store")
    ev = summary["evaluation"]
    assert ev is not None
    assert ev["table_md"] == summary["_table_md"]
    tuned_hard = next(r for r in ev["rows"] if r["model"] == "tuned" and r["group"] == "hard")
    assert tuned_hard["emergence"] == 1.0 and tuned_hard["valid"] == 1.0
    assert ev["selectivity"]["tuned"]["emergence_hard_minus_easy"] == 1.0
    assert ev["selectivity"]["base"]["emergence_hard_minus_easy"] == 0.0
    assert ev["plot"].endswith("emergence_accuracy.png")
    saved = json.loads(Path(summary["last_run"]).read_text())
    assert saved["evaluation"]["rows"] == json.loads(json.dumps(ev["rows"]))
    assert not list(Path(summary["last_run"]).parent.glob(".*tmp*")), "published atomically, no temp left"


def test_report_prints_tables_and_writes_markdown_with_plot(tmp_path: Path) -> None:
    summary = _fake_run(tmp_path / "store")
    result = CliRunner().invoke(app, ["report", "--store", summary["store"]], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "glyph emergence" in out and "tuned" in out and "hard" in out
    assert "100% [" in out  # tuned emergence on hard, with its interval
    assert "selectivity, tuned: emergence hard − easy +1.00" in out
    assert "emergence_accuracy.png" in out
    assert "happy-run" in out and "/runs/flow-run/fdafed6f" in out
    md_path = Path(summary["last_run"]).with_name("report.md")
    md = md_path.read_text()
    assert summary["_table_md"].strip() in md
    assert "![Glyph emergence and accuracy by bucket](report_emergence_accuracy.png)" in md
    png = md_path.with_name("report_emergence_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG")


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
    assert "no run recorded" in result.output and "glyph run" in result.output


# ---------------------------------------------------------------------------------------------
# the on-demand server: which port, without starting Prefect


def test_port_taken_by_something_else_picks_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    started: dict[str, Any] = {}

    def fake_start(home: Path, host: str, port: int, timeout_s: float, echo: bool) -> server_mod.ServerInfo:
        started.update(home=home, port=port)
        return server_mod.ServerInfo(host, port, None, started=True)

    monkeypatch.setattr(server_mod, "_start", fake_start)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:  # not a Prefect server
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        info = server_mod.ensure_server("127.0.0.1", taken, echo=False)
    assert started["port"] == info.port != taken
    assert started["home"] == tmp_path / "home"


def test_stale_state_is_cleared_and_stop_is_harmless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    # The pid of a process that has exited: a server that died without `glyph server stop`.
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (home / "glyph-server.json").write_text(json.dumps({"pid": gone.pid, "host": "127.0.0.1", "port": 9}))
    assert "was not running" in server_mod.stop_server()
    assert not (home / "glyph-server.json").exists()
    assert "No glyph-started Prefect server" in server_mod.stop_server()
