"""A test-only CPU stage, written the way a new stage is added (docs/design.md, "Adding a stage"):
this file stands for the three places a real stage touches, marked below. Everything else (its
Prefect task and cache key, its place in the pipeline, its config in the profiles and in
`--set`, its `glyph lengths` command) is derived from the declaration.

`lengths` reads the SFT rows the rewrite stage wrote and records the length of each assistant
answer: a stage with one input from an earlier stage, one output, a config and a key.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from glyph_core.config import StrictModel
from glyph_core.outputs import Progress, StageOutput, StageStats, Timer
from glyph_core.stages import Stage
from glyph_core.storage import DatasetRef, Store, stage_key

# -- 1. glyph_core/config.py: its config -------------------------------------------------------


class LengthsConfig(StrictModel):
    min_chars: int = Field(default=0, description="answers shorter than this are left out")


# -- 2. glyph_core/lengths.py: its module (`key` and `run`) ------------------------------------

VERSION = "1"


def key(cfg: LengthsConfig, *, sft: DatasetRef) -> str:
    return stage_key("lengths", VERSION, {"sft": sft.sha256}, cfg.key_dump())


def run(
    store: Store, cfg: LengthsConfig, *, sft: DatasetRef, progress: Progress | None = None
) -> StageOutput:
    timer = Timer()
    rows = store.read_table(sft).to_pylist()
    lengths = [
        {"id": r["id"], "kind": r["kind"], "chars": len(r["messages"][-1]["content"])}
        for r in rows
        if len(r["messages"][-1]["content"]) >= cfg.min_chars
    ]
    out_key = key(cfg, sft=sft)
    table = pa.Table.from_pylist(
        lengths, schema=pa.schema([("id", pa.string()), ("kind", pa.string()), ("chars", pa.int64())])
    )
    ref = store.write_table(table, "lengths", out_key, "lengths.parquet")
    if progress is not None:
        progress(len(rows), len(rows))
    return StageOutput(
        stage="lengths",
        key=out_key,
        refs={"lengths": ref},
        stats=StageStats(
            rows_in=sft.rows,
            rows_out=ref.rows,
            drops={"short": len(rows) - len(lengths)},
            seconds=timer.seconds,
        ),
    )


# -- 3. glyph_core/stages.py: one declaration (there: `register(LENGTHS)`) -----------------------

LENGTHS = Stage(
    name="lengths",
    config=LengthsConfig,
    inputs=("sft",),
    outputs=("lengths",),
    run=run,
    key=key,
    help="The length of every SFT answer (a test-only stage).",
)
