"""Build SFT rows: latent prompt -> glyph trace for hard problems, -> natural answer for easy ones.

The student must learn *when* to use glyphs, not only how (README.md, "The glyph protocol and the prompts"), so the user turn is
always the clean latent prompt (no mention of symbols), and the assistant turn is

* ``kind="glyph"``: a kept teacher trace, for problems whose bucket is at or above
  ``cfg.glyph_min_bucket`` (every distinct kept trace of such a problem becomes a row);
* ``kind="natural"``: for training problems below that bucket, a natural-prompt generation
  when one is given (first by ``sample``, and only if it contains no glyph), else the gold
  solution made readable: GSM8K without its ``<<calc>>`` marks and with ``#### x`` turned
  into "The answer is x."; MATH as is; SVAMP as "76 - 25 = 51. The answer is 51.".

``cfg.natural_ratio`` natural rows per glyph row (rounded, capped by the easy problems
available). Easy problems with a natural generation are preferred, then a seeded hash of the
id decides, so the choice and the final shuffle (``random.Random(cfg.seed)``) are
deterministic. Kept traces of easy problems are not used as glyph rows (counted in
``stats["glyph_below_bucket"]``). Any id of a held-out problem raises LeakageError.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from glyph_core.config import BUCKETS, RewriteConfig
from glyph_core.errors import LeakageError, SchemaError
from glyph_core.glyphs import has_any_glyph
from glyph_core.outputs import Progress, StageOutput, StageStats, Timer, count_values
from glyph_core.prompts import TEMPLATE_HASH, latent_messages
from glyph_core.storage import DatasetRef, Store, stage_key

VERSION = "1"
"""Bump when this module changes what the stage writes (Prefect's TASK_SOURCE cannot see it)."""

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SFT_SCHEMA = pa.schema([("id", pa.string()), ("kind", pa.string()), ("messages", pa.list_(MESSAGE))])

_CALC = re.compile(r"<<[^<>]*>>")


def _num(tok: str) -> str:
    try:
        x = float(tok)
    except ValueError:
        return tok
    return str(int(x)) if x.is_integer() else repr(x)


def natural_solution(source: str, solution: str, answer: str) -> str:
    """The gold solution as a natural assistant answer (rules in the module docstring)."""
    if source == "gsm8k":
        body = _CALC.sub("", solution.rsplit("####", 1)[0]).strip()
        return f"{body}\nThe answer is {answer}.".strip()
    if source == "svamp":
        expr = " ".join(_num(t) for t in solution.split())
        expr = expr.replace("( ", "(").replace(" )", ")")
        if expr.startswith("(") and expr.endswith(")") and expr.count("(") == 1:
            expr = expr[1:-1]
        if expr == answer:
            return f"The answer is {answer}."
        return f"{expr} = {answer}. The answer is {answer}."
    return solution.strip()


@dataclass
class RewriteResult:
    table: pa.Table
    stats: dict[str, int] = field(default_factory=dict)


def _row(pid: str, kind: str, question: str, answer: str) -> dict[str, Any]:
    return {
        "id": pid,
        "kind": kind,
        "messages": [*latent_messages(question), {"role": "assistant", "content": answer}],
    }


def rewrite(
    kept: pa.Table, problems: pa.Table, cfg: RewriteConfig, natural: pa.Table | None = None
) -> RewriteResult:
    """SFT rows from kept glyph traces, problems, and optional kept natural-prompt generations."""
    for col in ("id", "sample", "completion"):
        if col not in kept.column_names:
            raise SchemaError(f"kept traces lack column {col!r}")
    for col in ("id", "source", "split", "question", "solution", "answer", "bucket"):
        if col not in problems.column_names:
            raise SchemaError(f"problems lack column {col!r}")
    probs = {
        r["id"]: r
        for r in problems.select(
            ["id", "source", "split", "question", "solution", "answer", "bucket"]
        ).to_pylist()
    }
    rank = {b: i for i, b in enumerate(BUCKETS)}
    min_rank = rank[cfg.glyph_min_bucket]

    def problem(pid: str) -> dict[str, Any]:
        if pid not in probs:
            raise SchemaError(f"trace id {pid!r} is not in the problems table")
        p = probs[pid]
        if p["split"] != "train":
            raise LeakageError(f"held-out problem {pid!r} reached rewrite")
        return p

    stats = {
        "glyph": 0,
        "natural_generated": 0,
        "natural_gold": 0,
        "glyph_below_bucket": 0,
        "natural_with_glyph": 0,
    }
    rows: list[dict[str, Any]] = []
    traces = sorted(
        kept.select(["id", "sample", "completion"]).to_pylist(), key=lambda r: (r["id"], r["sample"])
    )
    for t in traces:
        p = problem(t["id"])
        if rank[p["bucket"]] < min_rank:
            stats["glyph_below_bucket"] += 1
            continue
        rows.append(_row(t["id"], "glyph", p["question"], t["completion"]))
    stats["glyph"] = len(rows)

    generated: dict[str, str] = {}
    if natural is not None and natural.num_rows:
        for g in sorted(
            natural.select(["id", "sample", "completion"]).to_pylist(), key=lambda r: (r["id"], r["sample"])
        ):
            problem(g["id"])
            if has_any_glyph(g["completion"]):
                stats["natural_with_glyph"] += 1
            else:
                generated.setdefault(g["id"], g["completion"])

    easy = [p for p in probs.values() if p["split"] == "train" and rank[p["bucket"]] < min_rank]
    easy.sort(
        key=lambda p: (p["id"] not in generated, hashlib.sha256(f"{cfg.seed}:{p['id']}".encode()).hexdigest())
    )
    for p in easy[: round(cfg.natural_ratio * stats["glyph"])]:
        if p["id"] in generated:
            stats["natural_generated"] += 1
            text = generated[p["id"]]
        else:
            stats["natural_gold"] += 1
            text = natural_solution(p["source"], p["solution"], p["answer"])
        rows.append(_row(p["id"], "natural", p["question"], text))

    random.Random(cfg.seed).shuffle(rows)
    return RewriteResult(table=pa.Table.from_pylist(rows, schema=SFT_SCHEMA), stats=stats)


# ---------------------------------------------------------------------------------------------
# the stage (declared in glyph_core/stages.py)


def key(cfg: RewriteConfig, *, kept: DatasetRef, problems: DatasetRef) -> str:
    """The latent prompt is written into every SFT row, so the templates' hash is an input."""
    inputs = {"kept": kept.sha256, "problems": problems.sha256, "templates": TEMPLATE_HASH}
    return stage_key("rewrite", VERSION, inputs, cfg.key_dump())


def run(
    store: Store,
    cfg: RewriteConfig,
    *,
    kept: DatasetRef,
    problems: DatasetRef,
    progress: Progress | None = None,
) -> StageOutput:
    """SFT rows: latent prompt → glyph trace for hard problems, → natural answer for easy ones."""
    timer = Timer()
    out_key = key(cfg, kept=kept, problems=problems)
    result = rewrite(store.read_table(kept), store.read_table(problems), cfg)
    ref = store.write_table(result.table, "rewrite", out_key, "sft.parquet")
    return StageOutput(
        stage="rewrite",
        key=out_key,
        refs={"sft": ref},
        stats=StageStats(
            rows_in=kept.rows,
            rows_out=ref.rows,
            seconds=timer.seconds,
            extra={"kinds": count_values(result.table, "kind"), **dict(result.stats)},
        ),
    )
