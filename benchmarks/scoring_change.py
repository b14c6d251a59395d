"""How much the scoring change moved the numbers: the same completions scored by this checkout's
`score_completion` and by an older checkout's.

    git worktree add /tmp/old-scoring 741f4e1        # the commit before the evaluation's rewrite
    .venv/bin/python benchmarks/scoring_change.py --old-checkout /tmp/old-scoring \
        --out benchmarks/results/scoring_change.json benchmarks/results/sweep/points/*/completions.parquet \
        benchmarks/results/sweep/points/base_completions.parquet

Each file is an evaluation's completions table (`model`, `bucket`, `gold`, `completion`,
`finish_reason`, ...), as the evaluate stage keeps it. The old checkout's scorer runs in a
subprocess with that checkout first on `sys.path` (its `score_completion(text, gold)` knows no
finish reason); this checkout's runs here. Prints emergence, valid structure and accuracy per
file, model and bucket under both, with the difference, plus how many completions changed
verdict and why; writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from glyph_core.evaluate import score_completion  # noqa: E402

FIELDS = ("emerged", "valid", "correct")

OLD_SCORER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from glyph_core.evaluate import score_completion
for line in sys.stdin:
    row = json.loads(line)
    s = score_completion(row["completion"], row["gold"])
    print(json.dumps({k: bool(s[k]) for k in ("emerged", "valid", "correct")} | {"pred": s["pred"]}))
"""


def old_scores(checkout: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The old checkout's verdicts, one per row, from a subprocess that imports only it."""
    lines = "".join(json.dumps({"completion": r["completion"], "gold": r["gold"]}) + "\n" for r in rows)
    done = subprocess.run(
        [sys.executable, "-c", OLD_SCORER, str(checkout)],
        input=lines,
        capture_output=True,
        text=True,
        check=False,
        cwd=checkout,
    )
    if done.returncode != 0:
        raise SystemExit(f"error: the old scorer in {checkout} failed:\n{done.stderr[-2000:]}")
    out = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if len(out) != len(rows):
        raise SystemExit(f"error: the old scorer returned {len(out)} verdicts for {len(rows)} rows")
    return out


def why(old: dict[str, Any], new: dict[str, Any], row: dict[str, Any]) -> str:
    """A short name for why a verdict changed."""
    if old["correct"] and not new["correct"]:
        if row.get("finish_reason") == "length" and new["pred"] is None:
            return "correct → wrong: cut off, no explicit answer (no last-number guess)"
        return "correct → wrong: another answer extracted"
    if new["correct"] and not old["correct"]:
        return "wrong → correct: answer found (display maths, sentence, variation selector)"
    if old["valid"] != new["valid"]:
        return f"valid {old['valid']} → {new['valid']}"
    return f"emerged {old['emerged']} → {new['emerged']}"


def compare(path: Path, checkout: Path) -> dict[str, Any]:
    rows = pq.read_table(path).to_pylist()
    old = old_scores(checkout, rows)
    groups: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    reasons: dict[str, int] = defaultdict(int)
    for row, o in zip(rows, old, strict=True):
        n = score_completion(row["completion"], row["gold"], row.get("finish_reason"))
        n = {k: bool(n[k]) for k in FIELDS} | {"pred": n["pred"]}
        for bucket in (row["bucket"], "all"):
            g = groups[(row["model"], bucket)]
            for f in FIELDS:
                g[f"old_{f}"].append(int(o[f]))
                g[f"new_{f}"].append(int(n[f]))
        if any(o[f] != n[f] for f in FIELDS):
            reasons[why(o, n, row)] += 1
    table = []
    for (model, bucket), g in sorted(groups.items()):
        entry: dict[str, Any] = {"model": model, "bucket": bucket, "n": len(g["old_emerged"])}
        for f in FIELDS:
            old_rate = sum(g[f"old_{f}"]) / entry["n"]
            new_rate = sum(g[f"new_{f}"]) / entry["n"]
            entry[f] = {"old": old_rate, "new": new_rate, "change": new_rate - old_rate}
        table.append(entry)
    return {"file": str(path), "rows": len(rows), "by_group": table, "changed_verdicts": dict(reasons)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="completions tables (Parquet)")
    parser.add_argument("--old-checkout", type=Path, required=True, help="a checkout with the old scorer")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write")
    args = parser.parse_args(argv)
    if not (args.old_checkout / "glyph_core" / "evaluate.py").is_file():
        print(f"error: {args.old_checkout}: no glyph_core/evaluate.py there", file=sys.stderr)
        return 2
    results = [compare(p, args.old_checkout) for p in args.files]
    console = Console(width=150)
    for res in results:
        t = Table(title=f"{res['file']} ({res['rows']} completions): old → new scoring")
        for col in ("model", "bucket", "n", "emergence", "valid structure", "accuracy"):
            t.add_column(col, justify="left" if col in ("model", "bucket") else "right")
        for e in res["by_group"]:
            cells = [f"{e[f]['old']:.1%} → {e[f]['new']:.1%} ({e[f]['change'] * 100:+.1f})" for f in FIELDS]
            t.add_row(e["model"], e["bucket"], str(e["n"]), *cells)
        console.print(t)
        for reason, count in sorted(res["changed_verdicts"].items(), key=lambda kv: -kv[1]):
            console.print(f"  {count:4d}  {reason}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"old_checkout": str(args.old_checkout), "results": results}, indent=2) + "\n"
        )
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
