"""Agreement of greedy completions between two evaluation runs (vLLM against transformers).

    python benchmarks/agreement.py --store STORE --out DIR            # the two backends' latest runs
    python benchmarks/agreement.py --a A.parquet --b B.parquet --out DIR

Both runs score the same problems with the same models, greedy. For each model (base, tuned)
it reports how many completions are byte-identical, how many get the same scores (emergence,
valid structure, extracted answer, correctness) though the text differs, and where the first
differing completions part (the common prefix, in characters and in words), which tells a
late floating-point tie apart from a real difference. With `--store`, it finds the newest
evaluate output of each backend in a local store (its metrics.json names the backend), copies
their table.md, metrics.json and plot into DIR/<backend>/, and compares their scored.parquet.

Prints a table last and writes agreement.json into DIR.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

SCORES = ("emerged", "valid", "pred", "correct")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="a local store directory holding both evaluations")
    ap.add_argument("--a", help="scored completions of run A (parquet)")
    ap.add_argument("--b", help="scored completions of run B (parquet)")
    ap.add_argument("--a-backend", default="vllm")
    ap.add_argument("--b-backend", default="transformers")
    ap.add_argument("--out", required=True)
    ap.add_argument("--examples", type=int, default=5, help="differing completions to keep per model")
    args = ap.parse_args(argv)
    if not args.store and not (args.a and args.b):
        ap.error("give --store, or both --a and --b")
    return args


def latest_evaluation(store: Path, backend: str) -> Path:
    """The newest `evaluate/<key>/` directory whose metrics.json says `config.backend == backend`."""
    found = []
    for metrics in (store / "evaluate").glob("*/metrics.json"):
        try:
            cfg = json.loads(metrics.read_text()).get("config", {})
        except ValueError:
            continue
        if cfg.get("backend") == backend and (metrics.parent / "scored.parquet").is_file():
            found.append((metrics.stat().st_mtime, metrics.parent))
    if not found:
        raise SystemExit(f"error: {store}/evaluate holds no finished evaluation with backend {backend!r}")
    return max(found)[1]


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def compare(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]], examples: int = 5) -> dict[str, Any]:
    """Per model: exact matches, same scores, and the first differences."""
    b_by = {(r["model"], r["id"]): r for r in b_rows}
    a_keys = {(r["model"], r["id"]) for r in a_rows}
    if a_keys != set(b_by):
        missing = sorted(a_keys ^ set(b_by))[:5]
        raise SystemExit(f"error: the two runs scored different problems (e.g. {missing})")
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in a_rows):
        rows = [(r, b_by[(model, r["id"])]) for r in a_rows if r["model"] == model]
        exact = [a for a, b in rows if a["completion"] == b["completion"]]
        same_scores = [a for a, b in rows if all(a[k] == b[k] for k in SCORES)]
        differ = [(a, b) for a, b in rows if a["completion"] != b["completion"]]
        prefixes = [common_prefix(a["completion"], b["completion"]) for a, b in differ]
        out[model] = {
            "n": len(rows),
            "exact": len(exact),
            "exact_rate": len(exact) / len(rows) if rows else None,
            "same_scores": len(same_scores),
            "same_scores_rate": len(same_scores) / len(rows) if rows else None,
            "same_correct": sum(a["correct"] == b["correct"] for a, b in rows),
            "accuracy_a": sum(bool(a["correct"]) for a, _ in rows) / len(rows) if rows else None,
            "accuracy_b": sum(bool(b["correct"]) for _, b in rows) / len(rows) if rows else None,
            "differing_median_common_prefix_chars": sorted(prefixes)[len(prefixes) // 2]
            if prefixes
            else None,
            "differing_common_prefix_words": [
                len(a["completion"][:p].split()) for (a, _), p in zip(differ, prefixes, strict=True)
            ],
            "examples": [
                {
                    "id": a["id"],
                    "common_prefix_chars": p,
                    "a": a["completion"][max(0, p - 40) : p + 120],
                    "b": b["completion"][max(0, p - 40) : p + 120],
                    "same_scores": all(a[k] == b[k] for k in SCORES),
                }
                for (a, b), p in list(zip(differ, prefixes, strict=True))[:examples]
            ],
        }
    return out


def table(result: dict[str, Any], a: str, b: str) -> str:
    lines = [
        f"| model | n | identical completions ({a} = {b}) | same scores | same correctness | accuracy {a} | accuracy {b} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, r in result.items():
        lines.append(
            f"| {model} | {r['n']} | {r['exact']} ({100 * r['exact_rate']:.1f}%) | "
            f"{r['same_scores']} ({100 * r['same_scores_rate']:.1f}%) | {r['same_correct']} | "
            f"{100 * r['accuracy_a']:.1f}% | {100 * r['accuracy_b']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources: dict[str, Any] = {}
    if args.store:
        store = Path(args.store)
        paths = {}
        for backend in (args.a_backend, args.b_backend):
            d = latest_evaluation(store, backend)
            paths[backend] = d / "scored.parquet"
            dest = out / backend
            dest.mkdir(exist_ok=True)
            for name in ("table.md", "metrics.json", "emergence_accuracy.png"):
                if (d / name).is_file():
                    shutil.copy2(d / name, dest / name)
            sources[backend] = str(d)
        a_path, b_path = paths[args.a_backend], paths[args.b_backend]
    else:
        a_path, b_path = Path(args.a), Path(args.b)
        sources = {args.a_backend: str(a_path), args.b_backend: str(b_path)}
    result = compare(pq.read_table(a_path).to_pylist(), pq.read_table(b_path).to_pylist(), args.examples)
    md = table(result, args.a_backend, args.b_backend)
    (out / "agreement.json").write_text(
        json.dumps({"a": args.a_backend, "b": args.b_backend, "sources": sources, "models": result}, indent=2)
    )
    (out / "agreement.md").write_text(md + "\n")
    print(f"wrote {out / 'agreement.json'}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
