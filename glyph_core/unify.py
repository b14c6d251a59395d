r"""Unify GSM8K, SVAMP and MATH into one problems table with splits, difficulty and buckets.

Columns (:data:`PROBLEMS_SCHEMA`): ``id, source, split, question, solution, answer,
difficulty, bucket, level, type, math500``.

**Ids** come from upstream ids, so they are stable across runs and machines:
``gsm8k/<split>/<0-based line>``, ``svamp/<ID>`` (``svamp/chal-1``),
``math/<split>/<subject>/<n>`` (from ``unique_id`` ``test/algebra/1.json``).

**Held-out splits** (``split == "test"``): GSM8K test, MATH test (``math500`` flags the
MATH-500 subset), and a fixed SVAMP hold-out: the ``svamp_holdout`` (default 300) SVAMP rows
with the smallest ``sha256("glyph-svamp-holdout-v1:" + ID)``. That rule depends only on the
IDs, so it is the same on every machine and does not move when other rows change.

**Difficulty.** ``level`` is the raw per-source integer; ``difficulty`` maps it onto [0, 1]
by a fixed per-source rule (not fitted to the data, so it never drifts), and ``bucket`` cuts
``difficulty`` at 0.3 and 0.6 — the same cut points for every source:

| source | `level` (raw) | `difficulty` | easy | medium | hard |
|---|---|---|---|---|---|
| MATH | Level 1–5 | (level − 1) / 4 | 1–2 | 3 | 4–5 |
| MATH | "Level ?" (2 train rows) | 0.5, `level` null | | ✓ | |
| GSM8K | solution steps: non-empty lines before `####` | clip((steps − 2) / 6, 0, 1) | ≤ 3 | 4–5 | ≥ 6 |
| SVAMP | binary operators in `Equation` | clip((ops − 1) / 3, 0, 1) | ≤ 1 | 2 | ≥ 3 (none in SVAMP) |

SVAMP has no hard problem and GSM8K few (about 10 %): that is the data, not a bug — it is
why MATH supplies most glyph traces.

**De-duplication** by normalised question (:func:`normalize_question`: lowercase, whitespace,
prose punctuation ``.,;:!?'"`` (``.``/``,`` kept before a digit) and LaTeX cosmetics ``{}$\,\left\right`` removed; math operators
and brackets kept, because dropping them merged different MATH problems such as
``\arcsin 1`` / ``\arcsin (-1)``), in this order:

1. within one split, only the first occurrence is kept (sources in config order, then file
   order; in the held-out split a MATH-500 row wins over a non-MATH-500 duplicate);
2. a training row whose question also appears in the held-out split is removed from training
   (held-out sets stay complete, so results stay comparable with published numbers);
3. rows without a usable gold answer (MATH train/number_theory/7115 and 7117 have an empty
   ``\boxed{}``) are dropped.

Then :func:`check_leakage` asserts that no held-out question remains in training and raises
:class:`~glyph_core.errors.LeakageError` otherwise; it is separate so it can guard any table.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from glyph_core.config import UnifyConfig
from glyph_core.errors import GlyphError, LeakageError, SchemaError
from glyph_core.fingerprints import RevisionResolver, SourcesRef, fingerprint_sources, hub_commit
from glyph_core.outputs import Progress, StageOutput, StageStats, Timer, count_values
from glyph_core.sources import SOURCES as KNOWN_SOURCES
from glyph_core.sources import LoadDataset, Record, load_source, unknown_source
from glyph_core.storage import Store, stage_key

VERSION = "1"
"""Bump when this module changes what the stage writes (Prefect's TASK_SOURCE cannot see it)."""

EASY_BELOW = 0.3
HARD_FROM = 0.6
SVAMP_HOLDOUT_SALT = "glyph-svamp-holdout-v1:"

PROBLEMS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("question", pa.string()),
        ("solution", pa.string()),
        ("answer", pa.string()),
        ("difficulty", pa.float64()),
        ("bucket", pa.string()),
        ("level", pa.int32()),
        ("type", pa.string()),
        ("math500", pa.bool_()),
    ]
)


# ---------------------------------------------------------------------------------------------
# difficulty


def difficulty(source: str, level: int | None) -> float:
    """The documented per-source map of the raw level onto [0, 1] (table in the module doc)."""
    if level is None:
        return 0.5
    if source == "math":
        return min(max((level - 1) / 4, 0.0), 1.0)
    if source == "gsm8k":
        return min(max((level - 2) / 6, 0.0), 1.0)
    if source == "svamp":
        return min(max((level - 1) / 3, 0.0), 1.0)
    raise unknown_source(source)


def bucket(d: float) -> str:
    return "easy" if d < EASY_BELOW else "medium" if d < HARD_FROM else "hard"


# ---------------------------------------------------------------------------------------------
# normalisation, hold-out, leakage

# Prose punctuation and LaTeX cosmetics only. Math operators, parentheses and brackets stay:
# stripping them made "sin(-60°)" equal "sin 60°" and "k > 0" equal "k < 0" in MATH.
# "." and "," stay before a digit (22.5 is not 225; (2,3) is not (23)).
_COSMETIC = re.compile(r"[.,](?!\d)|[\s;:!?'\"`{}$~]+|\\[,;!: ]|\\(?:left|right|displaystyle)\b")


def normalize_question(text: str) -> str:
    """The de-duplication key: lowercase, whitespace, prose punctuation and LaTeX cosmetics removed."""
    return _COSMETIC.sub("", text.lower())


def _hash(salt: str, key: str) -> str:
    return hashlib.sha256(f"{salt}{key}".encode()).hexdigest()


def svamp_holdout_ids(ids: list[str], n: int) -> set[str]:
    """The ``n`` SVAMP ids with the smallest salted sha256: a fixed, documented hold-out."""
    return set(sorted(ids, key=lambda i: _hash(SVAMP_HOLDOUT_SALT, i))[:n])


def check_leakage(table: pa.Table, limit: int = 5) -> None:
    """Raise LeakageError if any training question (normalised) is also a held-out question."""
    for col in ("split", "question"):
        if col not in table.column_names:
            raise SchemaError(f"problems table has no column {col!r}")
    splits = table.column("split").to_pylist()
    questions = table.column("question").to_pylist()
    ids = (
        table.column("id").to_pylist() if "id" in table.column_names else [str(i) for i in range(len(splits))]
    )
    held: dict[str, str] = {}
    for i, (s, q) in enumerate(zip(splits, questions, strict=True)):
        if s != "train":
            held.setdefault(normalize_question(q), ids[i])
    leaks = [
        (ids[i], held[n])
        for i, (s, q) in enumerate(zip(splits, questions, strict=True))
        if s == "train" and (n := normalize_question(q)) in held
    ]
    if leaks:
        shown = ", ".join(f"{a} = {b}" for a, b in leaks[:limit])
        raise LeakageError(f"{len(leaks)} training question(s) also held out: {shown}")


# ---------------------------------------------------------------------------------------------
# unify


@dataclass
class UnifyResult:
    table: pa.Table
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows removed, by reason: duplicate_in_split, overlaps_heldout, no_answer, subsampled."""

    def summary(self) -> list[dict[str, Any]]:
        """Rows per (source, split, bucket), for the CLI and task artifacts."""
        c = Counter(
            zip(
                self.table.column("source").to_pylist(),
                self.table.column("split").to_pylist(),
                self.table.column("bucket").to_pylist(),
                strict=True,
            )
        )
        rank = {"easy": 0, "medium": 1, "hard": 2}
        keys = sorted(c, key=lambda k: (k[0], k[1] != "train", rank.get(k[2], 3)))
        return [{"source": s, "split": sp, "bucket": b, "rows": c[(s, sp, b)]} for s, sp, b in keys]


def _subsample(rows: list[Record], n: int | None, seed: int) -> list[Record]:
    """At most ``n`` rows per source, chosen by a seeded hash of the id (MATH-500 first)."""
    if n is None:
        return rows
    out: list[Record] = []
    for src in dict.fromkeys(r["source"] for r in rows):
        group = [r for r in rows if r["source"] == src]
        group.sort(key=lambda r: (not r["math500"], _hash(f"glyph-sample-{seed}:", r["id"])))
        out += group[:n]
    return out


def unify_records(records: list[Record], cfg: UnifyConfig) -> UnifyResult:
    """Splits, difficulty, de-duplication and leakage check over already-loaded records."""
    dropped: Counter[str] = Counter(
        {"duplicate_in_split": 0, "overlaps_heldout": 0, "no_answer": 0, "subsampled": 0}
    )
    svamp_ids = [r["id"] for r in records if r["source"] == "svamp"]
    held_svamp = svamp_holdout_ids(svamp_ids, cfg.svamp_holdout)
    rows: list[Record] = []
    for r in records:
        if r["answer"] is None or not str(r["answer"]).strip():
            dropped["no_answer"] += 1
            continue
        r = dict(r)
        if r["source"] == "svamp":
            r["split"] = "test" if r["id"] in held_svamp else "train"
        r["difficulty"] = difficulty(r["source"], r["level"])
        r["bucket"] = bucket(r["difficulty"])
        r["_norm"] = normalize_question(r["question"])
        rows.append(r)

    # 1. first occurrence per split; held-out: MATH-500 rows first so they are never the dropped copy
    test = sorted((r for r in rows if r["split"] == "test"), key=lambda r: not r["math500"])
    train = [r for r in rows if r["split"] == "train"]
    kept: dict[str, list[Record]] = {}
    for split, group in (("test", test), ("train", train)):
        seen: set[str] = set()
        kept[split] = []
        for r in group:
            if r["_norm"] in seen:
                dropped["duplicate_in_split"] += 1
                continue
            seen.add(r["_norm"])
            kept[split].append(r)
    # 2. training rows that repeat a held-out question leave training
    held = {r["_norm"] for r in kept["test"]}
    before = len(kept["train"])
    kept["train"] = [r for r in kept["train"] if r["_norm"] not in held]
    dropped["overlaps_heldout"] += before - len(kept["train"])

    order = {r["id"]: i for i, r in enumerate(rows)}
    final: list[Record] = []
    for split, limit in (("train", cfg.max_train_per_source), ("test", cfg.max_test_per_source)):
        chosen = _subsample(kept[split], limit, cfg.seed)
        dropped["subsampled"] += len(kept[split]) - len(chosen)
        final += chosen
    final.sort(key=lambda r: order[r["id"]])

    table = pa.Table.from_pylist(
        [{k: r[k] for k in PROBLEMS_SCHEMA.names} for r in final], schema=PROBLEMS_SCHEMA
    )
    check_leakage(table)
    for split in ("train", "test"):
        if not any(r["split"] == split for r in final):
            # Caught here, not two stages later as "SFT rows are empty" or as a 0 % evaluation.
            raise GlyphError(
                f"unify: no {split} problems left from sources {', '.join(cfg.sources)} "
                f"({len(records)} records read, svamp_holdout={cfg.svamp_holdout}): "
                "check the data directory and unify.sources"
            )
    return UnifyResult(table=table, dropped=dict(dropped))


def unify(
    cfg: UnifyConfig,
    data_dir: str | Path | None = None,
    revisions: Mapping[str, str | None] | None = None,
    load: LoadDataset | None = None,
) -> UnifyResult:
    """Load every configured source (local ``data_dir`` or ``cfg.data_dir``, else the Hub at
    ``revisions``, through ``load``: ``datasets.load_dataset`` by default) and unify."""
    for name in cfg.sources:
        if name not in KNOWN_SOURCES:
            raise unknown_source(name)
    root = data_dir if data_dir is not None else cfg.data_dir
    records: list[Record] = []
    for name in cfg.sources:
        records += load_source(name, root, revisions, load)
    return unify_records(records, cfg)


# ---------------------------------------------------------------------------------------------
# the stage (declared in glyph_core/stages.py)


def _key(cfg: UnifyConfig, sources: SourcesRef) -> str:
    config = {k: v for k, v in cfg.key_dump().items() if k != "data_dir"}
    return stage_key("unify", VERSION, {"sources": sources.sha256}, config)


def key(cfg: UnifyConfig, *, resolve: RevisionResolver = hub_commit) -> str:
    """Keyed on the sources' content (`fingerprint_sources`), not on where they are: `data_dir`
    leaves the config part, so the same files at another path hit the same key; from the Hub,
    on the commits the revisions name now (`resolve`), so a dataset change recomputes."""
    return _key(cfg, fingerprint_sources(cfg, resolve))


def run(
    store: Store,
    cfg: UnifyConfig,
    *,
    progress: Progress | None = None,
    resolve: RevisionResolver = hub_commit,
    load: LoadDataset | None = None,
) -> StageOutput:
    """Load and unify the sources into the problems table: from the Hub, exactly the commits
    the key names (resolved once, here), whatever the branch points at by the time they load."""
    timer = Timer()
    sources = fingerprint_sources(cfg, resolve)
    out_key = _key(cfg, sources)
    result = unify(cfg, revisions=sources.revisions, load=load)
    ref = store.write_table(result.table, "unify", out_key, "problems.parquet")
    extra = {"splits": count_values(result.table, "split"), "buckets": count_values(result.table, "bucket")}
    return StageOutput(
        stage="unify",
        key=out_key,
        refs={"problems": ref},
        stats=StageStats(
            rows_in=result.table.num_rows + sum(result.dropped.values()),
            rows_out=ref.rows,
            drops={k: v for k, v in result.dropped.items() if v},
            seconds=timer.seconds,
            extra=extra,
        ),
    )
