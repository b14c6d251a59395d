"""CPU stage benchmark: unify of all local data, and filter of synthetic traces.

    .venv/bin/python benchmarks/cpu_stages.py [--data-dir ../shared/data] [--traces 100000]

Synthetic traces are drawn from the unified training problems: 70 % correct glyph traces,
10 % wrong answers, 8 % broken structure, 5 % truncated, 4 % too long, 3 % duplicates. Final
answers are written in varied forms (plain, boxed, ``$…$``, with units or thousands commas)
so the cheap comparison and math-verify both get exercised, as they would on teacher output.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from glyph_core.answers import to_number
from glyph_core.config import FilterConfig, UnifyConfig
from glyph_core.filter import filter_traces
from glyph_core.glyphs import format_trace
from glyph_core.unify import unify


def _variant(answer: str) -> str:
    """An equivalent spelling a teacher might use, which plain string equality misses."""
    num = to_number(answer)
    if num is not None and num.denominator in (2, 4, 5, 8, 10) and num.denominator != 1:
        return str(float(num))
    v = re.sub(r"\\(sqrt|frac)\{(\w)\}", r"\\\1\2", answer)  # \sqrt{3} -> \sqrt3
    return v.replace("\\frac", "\\dfrac") if v == answer else v


def _final(answer: str, rng: random.Random) -> str:
    if rng.random() < 0.15:
        answer = _variant(answer)
    r = rng.random()
    if r < 0.3:
        return f"\\boxed{{{answer}}}"
    if r < 0.5:
        return f"${answer}$"
    if r < 0.6 and answer.lstrip("-").isdigit():
        return f"{int(answer):,} units"
    return answer


def synthetic_traces(problems: pa.Table, n: int, seed: int = 0) -> pa.Table:
    train = problems.filter(pc.equal(problems["split"], "train"))
    ids, answers = train["id"].to_pylist(), train["answer"].to_pylist()
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        j = rng.randrange(len(ids))
        kind = rng.random()
        ans = answers[j] if kind >= 0.10 else answers[j] + "1"
        steps = [f"compute part {s} of problem {j} with care" for s in range(rng.randint(1, 4))]
        text = format_trace("Use the rule.", "Split the problem.", steps, "So it follows.", _final(ans, rng))
        if 0.10 <= kind < 0.18:
            text = text.replace("\U0001f703", "")  # no takeaway
        finish, tokens = "stop", rng.randint(50, 900)
        if 0.18 <= kind < 0.23:
            finish = "length"
        elif 0.23 <= kind < 0.27:
            tokens = 5000
        sample = k
        if 0.27 <= kind < 0.30 and rows:
            prev = rows[-1]
            rows.append({**prev, "sample": prev["sample"] + 1})
            continue
        rows.append(
            {
                "id": ids[j],
                "sample": sample,
                "prompt": f"problem {j}",
                "completion": text,
                "finish_reason": finish,
                "prompt_tokens": 100,
                "completion_tokens": tokens,
                "teacher": "synthetic",
            }
        )
    return pa.Table.from_pylist(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    ap.add_argument("--data-dir", default=os.environ.get("GLYPH_DATA_DIR", str(default)))
    ap.add_argument("--traces", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()

    out = Table(title=f"CPU stages ({os.cpu_count()} cores)")
    for col in ("stage", "rows", "seconds", "rows/s", "notes"):
        out.add_column(col, justify="right" if col in ("rows", "seconds", "rows/s") else "left")

    t = time.perf_counter()
    res = unify(UnifyConfig(), args.data_dir)
    dt = time.perf_counter() - t
    out.add_row(
        "unify (all local data)",
        f"{res.table.num_rows:,}",
        f"{dt:.2f}",
        f"{res.table.num_rows / dt:,.0f}",
        f"dropped {res.dropped}",
    )

    traces = synthetic_traces(res.table, args.traces)
    t = time.perf_counter()
    fr = filter_traces(traces, res.table, FilterConfig(workers=args.workers))
    dt = time.perf_counter() - t
    out.add_row(
        "filter (synthetic traces)",
        f"{traces.num_rows:,}",
        f"{dt:.2f}",
        f"{traces.num_rows / dt:,.0f}",
        f"kept {fr.kept.num_rows:,}; drops {fr.drop_counts()}",
    )
    Console(width=200).print(out)


if __name__ == "__main__":
    main()
