"""The H100 study (benchmarks/sweep_study.sh, benchmarks/sweep_study.yaml), checked where it
can be here: its points vary every lever the issue names, its evaluation sample on the real
held-out data is as large as the script says, and its dry run on CPU (the tiny profile) writes
the folder a study keeps."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from glyph_core.config import EvalConfig, UnifyConfig
from glyph_core.evaluate import sample_heldout
from glyph_core.metrics import wilson
from glyph_core.profiles import parse_sets
from glyph_core.sweep import load_spec, plan_sweep
from glyph_core.unify import unify

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "sweep_study.sh"
STUDY = REPO / "benchmarks" / "sweep_study.yaml"
LEVERS = (
    "rewrite.glyph_min_bucket",  # the bucket threshold
    "rewrite.natural_ratio",  # natural rows per glyph row
    "rewrite.natural_balance",  # which easy problems get natural rows
    "rewrite.natural_hard_fraction",  # natural answers for hard problems too
    "rewrite.glyph_min_bucket_by_source",  # thresholds per source
    "train.epochs",
    "train.learning_rate",
)


def _script_sets() -> dict[str, Any]:
    """The `--set key=value` the script gives on the GPU (not the dry run's), parsed as `--set`."""
    text = SCRIPT.read_text()
    gpu = text[text.index("else\n  sizes=(") :]
    return parse_sets(re.findall(r"--set (\S+)", gpu[: gpu.index(")\nfi")]))


def test_the_study_has_at_least_eight_points_over_every_lever() -> None:
    spec = load_spec(STUDY)
    sets = {k: v for k, v in _script_sets().items() if k != "unify.data_dir"}
    plan = plan_sweep(spec.profile or "demo", {**spec.set, **sets}, spec.grid, spec.points)
    assert len(plan.points) >= 8
    for lever in LEVERS:
        assert len({json.dumps(p.settings[lever], sort_keys=True) for p in plan.points}) >= 2, lever
    # an ablation path: every point differs from another point in one lever only, so each
    # lever's effect is one row against another (gpu-run -> hard-0.5-pooled -> hard-1-pooled
    # -> centre, and centre -> each of the others)
    for p in plan.points:
        one_apart = [
            q.name for q in plan.points if sum(p.settings[k] != q.settings[k] for k in plan.swept) == 1
        ]
        assert one_apart, p.name
    assert sets["evaluate.backend"] == "vllm" and spec.profile == "demo"


def test_the_evaluation_sample_gives_intervals_of_about_seven_points(data_dir: Path) -> None:
    per_stratum = int(_script_sets()["evaluate.per_stratum"])
    problems = unify(UnifyConfig(data_dir=str(data_dir), max_train_per_source=1)).table
    sample = sample_heldout(problems, EvalConfig(per_stratum=per_stratum)).to_pylist()
    buckets = Counter(r["bucket"] for r in sample)
    math = Counter(
        "1-2" if r["level"] <= 2 else "4-5" if r["level"] >= 4 else "3"
        for r in sample
        if r["source"] == "math"
    )
    print(f"\n{len(sample)} problems; buckets {dict(buckets)}; MATH level groups {dict(math)}")
    for n in (*buckets.values(), math["1-2"], math["4-5"]):
        lo, hi = wilson(n // 2, n)
        assert (hi - lo) / 2 <= 0.071, n  # the widest interval, at a rate of 50 %
    assert len(sample) < 1300  # what the ~15-minute budget was sized for


def test_the_script_refuses_a_missing_data_folder(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "GLYPH_DATA_DIR": str(tmp_path), "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "error: GLYPH_DATA_DIR" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_dry_run_writes_the_study_folder(data_dir: Path, tmp_path: Path) -> None:
    """The whole command on CPU with the tiny profile: 8 points, the folder with the table, the
    plot, the record, each point's metrics, the commands and the log."""
    out = tmp_path / "sweep"
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "GLYPH_DATA_DIR": str(data_dir),
        "OUT": str(out),
        "STORE": str(tmp_path / "store"),
        "PYTHON": str(REPO / ".venv" / "bin" / "python"),
    }
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "sweep.json").read_text())
    names = [p["name"] for p in record["points"]]
    assert len(names) == 8 and all(p["state"] == "completed" for p in record["points"])
    assert sorted(p.name for p in (out / "points").iterdir()) == sorted(names)
    assert (out / "frontier.png").read_bytes().startswith(b"\x89PNG")
    table = (out / "table.md").read_text()
    assert all(f"| {n} |" in table or f"| {n} **(best)** |" in table for n in names)
    assert (
        "glyph sweep --file benchmarks/sweep_study.yaml --profile tiny" in (out / "command.txt").read_text()
    )
    assert "DRY_RUN=1" in (out / "study_command.txt").read_text()
    assert "exit status 0" in (out / "sweep.log").read_text()
    # The points share what they agree on: one unify, and rewrite once per distinct recipe.
    ran = Counter(s["stage"] for p in record["points"] for s in p["stages"] if not s["cached"])
    assert ran["unify"] == 1 and ran["generate"] == 1 and ran["rewrite"] == 6 and ran["train"] == 8
