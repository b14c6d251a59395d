"""Build SFT rows: latent prompt -> glyph trace for hard problems, -> natural answer for easy ones.

The student must learn *when* to use glyphs, not only how (README.md, "The glyph protocol and the
prompts"), so the user turn is always the clean latent prompt (no mention of symbols), and the
assistant turn is

* ``kind="glyph"``: a kept teacher trace, for problems on the *glyph side*: their bucket is at
  or above ``cfg.glyph_min_bucket``, or above the source's own threshold where
  ``cfg.glyph_min_bucket_by_source`` names one (``{"math": "hard"}``: MATH levels 4–5 only,
  while GSM8K follows ``glyph_min_bucket``). Every distinct kept trace of such a problem becomes
  a row;
* ``kind="natural"``: a natural-prompt generation when one is given (first by ``sample``, and
  only if it contains no glyph), else the gold solution made readable: GSM8K without its
  ``<<calc>>`` marks and with ``#### x`` turned into "The answer is x."; MATH as is; SVAMP as
  "76 - 25 = 51. The answer is 51.". With the reference teacher (the study's), these are the
  same solutions the glyph traces are built from, so the two kinds differ only in form.

Which problems get natural rows (the levers, each a field of ``RewriteConfig``):

* ``natural_ratio``: natural rows per glyph row, from the training problems below the glyph side
  ("easy problems": every problem of a lower bucket, mediums included when the threshold is hard).
  Easy problems with a natural generation are preferred, then a seeded hash of the id decides,
  so the choice is deterministic. Capped by the easy problems available; the shortfall is
  counted in ``stats["natural_short"]``.
* ``natural_balance``: ``pooled`` draws those rows from the easy problems of every source at
  once, so a source contributes natural rows in proportion to its easy problems (SVAMP and GSM8K
  dominate, and MATH, which supplies most glyph rows, gets few: the model can learn "LaTeX →
  glyphs"). ``per_source`` gives each source ``natural_ratio`` × its own glyph rows from its own
  easy problems, so MATH levels 1–2 get natural rows in proportion to MATH's glyph rows: within
  MATH, where the study's goal is stated, the data then says *when*, not *which source*.
* ``natural_hard_fraction``: that share of the glyph-side problems (those with kept traces,
  chosen by a seeded hash) is answered naturally instead of with its glyph traces. The glyph
  rows then no longer cover every hard problem, which may make glyph use a choice that
  difficulty raises rather than a habit the prompt's form triggers; the sweep measures whether it does.

Kept traces of problems below the glyph side are not used as glyph rows (counted in
``stats["glyph_below_bucket"]``). The final shuffle is ``random.Random(cfg.seed)``. Any id of a
held-out problem raises LeakageError.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
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


def _hash_order(seed: int, salt: str, pid: str) -> str:
    return hashlib.sha256(f"{seed}:{salt}{pid}".encode()).hexdigest()


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

    def glyph_side(p: dict[str, Any]) -> bool:
        threshold = cfg.glyph_min_bucket_by_source.get(p["source"], cfg.glyph_min_bucket)
        return rank[p["bucket"]] >= rank[threshold]

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
        "glyph_as_natural": 0,
        "natural_short": 0,
    }
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

    rows: list[dict[str, Any]] = []

    def add_natural(p: dict[str, Any]) -> None:
        if p["id"] in generated:
            stats["natural_generated"] += 1
            text = generated[p["id"]]
        else:
            stats["natural_gold"] += 1
            text = natural_solution(p["source"], p["solution"], p["answer"])
        rows.append(_row(p["id"], "natural", p["question"], text))

    traces = sorted(
        kept.select(["id", "sample", "completion"]).to_pylist(), key=lambda r: (r["id"], r["sample"])
    )
    glyph_traces: list[tuple[dict[str, Any], str]] = []
    for t in traces:
        p = problem(t["id"])
        if not glyph_side(p):
            stats["glyph_below_bucket"] += 1
            continue
        glyph_traces.append((p, t["completion"]))
    # natural_hard_fraction: whole problems (all their traces) switch to one natural row.
    glyph_ids = sorted({p["id"] for p, _ in glyph_traces}, key=lambda i: _hash_order(cfg.seed, "hard:", i))
    as_natural = set(glyph_ids[: round(cfg.natural_hard_fraction * len(glyph_ids))])
    glyph_per_source: Counter[str] = Counter()
    for p, completion in glyph_traces:
        if p["id"] not in as_natural:
            rows.append(_row(p["id"], "glyph", p["question"], completion))
            glyph_per_source[p["source"]] += 1
    stats["glyph"] = len(rows)
    for pid in sorted(as_natural):
        stats["glyph_as_natural"] += 1
        add_natural(probs[pid])

    easy = [p for p in probs.values() if p["split"] == "train" and not glyph_side(p)]
    easy.sort(key=lambda p: (p["id"] not in generated, _hash_order(cfg.seed, "", p["id"])))
    if cfg.natural_balance == "pooled":
        quotas = [(easy, round(cfg.natural_ratio * stats["glyph"]))]
    else:  # per_source: each source's glyph rows get natural rows from its own easy problems
        quotas = [
            ([p for p in easy if p["source"] == source], round(cfg.natural_ratio * n))
            for source, n in sorted(glyph_per_source.items())
        ]
    for pool, wanted in quotas:
        for p in pool[:wanted]:
            add_natural(p)
        stats["natural_short"] += max(0, wanted - len(pool))

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
