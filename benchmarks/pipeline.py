"""Benchmark: the whole `tiny` profile cold, then fully cached, on a local store and on SeaweedFS.

    .venv/bin/python benchmarks/pipeline.py [--backends local,seaweedfs] [--json out.json]

Per stage it prints the cold and cached wall time of the task as the flow sees it, and Prefect's
own overhead: task wall time minus the stage function's own time (for a cached stage the stage
function does not run, so the whole task time is overhead: cache-key computation, the result
record read, state round trips to the API, the artifact check).

Prefect's temporary server is started by a no-op flow before anything is timed, so start-up is
reported on its own line rather than charged to the first stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _tiny_data(work: Path) -> Path:
    from pipeline_helpers import make_tiny_data

    src = Path(os.environ.get("GLYPH_DATA_DIR", REPO.parent / "shared" / "data"))
    return make_tiny_data(src, work / "data")


def _run(store: str, data: Path) -> dict[str, Any]:
    from flows.pipeline import pipeline

    t0 = time.perf_counter()
    summary = pipeline(
        profile="tiny", store=store, overrides={"unify.data_dir": str(data), "unify.svamp_holdout": 10}
    )
    summary["wall"] = time.perf_counter() - t0
    return summary


def bench(backend: str, work: Path, data: Path) -> dict[str, Any]:
    if backend == "local":
        store = str(work / "store-local")
        cold, warm = _run(store, data), _run(store, data)
        return {"backend": backend, "cold": cold, "cached": warm}
    from s3_server import seaweed

    with seaweed(work / "seaweed") as server:
        store = f"s3://{server.make_bucket()}/bench"
        cold, warm = _run(store, data), _run(store, data)
    return {"backend": backend, "cold": cold, "cached": warm}


def print_table(results: list[dict[str, Any]], startup_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    console.print(f"Prefect temporary server start-up (not in the numbers below): {startup_s:.2f}s")
    for res in results:
        table = Table(title=f"tiny profile on {res['backend']}")
        for col in ("stage", "cold s", "stage fn s", "prefect overhead cold s", "cached s", "cached state"):
            table.add_column(col, justify="right" if col != "stage" else "left")
        cold = {r["stage"]: r for r in res["cold"]["stages"]}
        warm = {r["stage"]: r for r in res["cached"]["stages"]}
        for stage, c in cold.items():
            w = warm[stage]
            table.add_row(
                stage,
                f"{c['seconds']:.3f}",
                f"{c['stage_seconds']:.3f}",
                f"{c['overhead_seconds']:.3f}",
                f"{w['seconds']:.3f}",
                "Cached" if w["cached"] else "ran",
            )
        table.add_row(
            "flow total",
            f"{res['cold']['wall']:.3f}",
            f"{sum(r['stage_seconds'] for r in cold.values()):.3f}",
            f"{sum(r['overhead_seconds'] for r in cold.values()):.3f}",
            f"{res['cached']['wall']:.3f}",
            "",
        )
        console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="local,seaweedfs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from prefect import flow

    @flow(name="glyph-bench-warmup")
    def warmup() -> None:
        return None

    t0 = time.perf_counter()
    warmup()
    startup = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="glyph-bench-") as tmp:
        work = Path(tmp)
        data = _tiny_data(work)
        results = [bench(b.strip(), work, data) for b in args.backends.split(",") if b.strip()]
    print_table(results, startup)
    if args.json:
        args.json.write_text(json.dumps({"startup_s": startup, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
