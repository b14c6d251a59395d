"""Evaluation statistics benchmark: scoring, aggregation, bootstrap selectivity, report and plot
on a full-size synthetic evaluation (every held-out problem, base and tuned).

    .venv/bin/python benchmarks/eval_metrics.py [--data-dir ../shared/data] [--resamples 2000]
        [--out benchmarks/results/eval_metrics.json]

The problems are the real held-out split (unify of the local data); the completions are
synthetic: the base model answers in prose, the tuned one writes a glyph trace with a
probability that rises with the source's own difficulty level, 10 % of the tuned traces are cut
at the token limit. What is timed is everything after generation.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from glyph_core.config import UnifyConfig
from glyph_core.eval_report import markdown_report, plot_png
from glyph_core.evaluate import VERSION, score_rows
from glyph_core.glyphs import format_trace
from glyph_core.metrics import aggregate, build_metrics, selectivity
from glyph_core.profiles import default_data_dir
from glyph_core.unify import unify


def _completion(r: dict, tuned: bool, rng: random.Random) -> SimpleNamespace:
    level = r["level"] or 3
    p_glyph = {"math": 0.15 * level, "gsm8k": 0.1 * (level - 1), "svamp": 0.1 * level}[r["source"]]
    if tuned and rng.random() < p_glyph:
        text = format_trace("rule", "plan", ["step one", "step two"], "so", f"\\boxed{{{r['answer']}}}")
        if rng.random() < 0.1:
            return SimpleNamespace(
                text=text[: len(text) // 2],
                finish_reason="length",
                prompt_tokens=80,
                completion_tokens=512,
                error=None,
            )
    else:
        text = f"We add the parts and get {r['answer']}. So the answer is {r['answer']}."
    return SimpleNamespace(
        text=text, finish_reason="stop", prompt_tokens=80, completion_tokens=len(text) // 4, error=None
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=default_data_dir())
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_metrics.json"))
    args = ap.parse_args()

    problems = unify(UnifyConfig(data_dir=args.data_dir)).table
    held = problems.filter(pc.equal(problems["split"], "test")).to_pylist()
    rng = random.Random(0)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    scored = pa.concat_tables(
        [
            score_rows(held, [_completion(r, tuned, rng) for r in held], label)
            for label, tuned in (("base", False), ("tuned", True))
        ]
    )
    timings["score (both models)"] = time.perf_counter() - t
    t = time.perf_counter()
    table = aggregate(scored)
    timings["aggregate"] = time.perf_counter() - t
    t = time.perf_counter()
    selectivity(scored, resamples=args.resamples)
    timings[f"selectivity ({args.resamples} resamples)"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = build_metrics(
        scored, table, {"config": {"max_new_tokens": 512}}, version=VERSION, resamples=args.resamples
    )
    timings["build_metrics (all of it)"] = time.perf_counter() - t
    t = time.perf_counter()
    markdown_report(metrics, original_study=True)
    timings["markdown_report"] = time.perf_counter() - t
    t = time.perf_counter()
    plot_png(metrics)
    timings["plot_png"] = time.perf_counter() - t

    out = Table(title=f"evaluation statistics on {len(held)} held-out problems x 2 models")
    out.add_column("step")
    out.add_column("seconds", justify="right")
    for name, sec in timings.items():
        out.add_row(name, f"{sec:.2f}")
    Console().print(out)
    tuned = metrics["models"]["tuned"]["selectivity"]
    result = {
        "problems": len(held),
        "completions": scored.num_rows,
        "resamples": args.resamples,
        "seconds": timings,
        "within_source_auroc": tuned["within_source"]["auroc"],
        "pooled_auroc": tuned["pooled"]["auroc"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
