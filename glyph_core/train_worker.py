"""The entry point `accelerate launch` runs on every rank (see glyph_core/launch.py).

    python -m accelerate.commands.launch --num_processes N -m glyph_core.train_worker ARGS.json

ARGS.json holds the train config, the output directory and the rows (a store root and a
DatasetRef, or a Parquet path). Every rank calls `glyph_core.trainer.train_sft`; rank 0 writes
the artifact, ``metrics.parquet`` beside it, ``progress.json`` after every step and its log
lines to ``log.jsonl``, for the parent to read.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from glyph_core.config import TrainConfig
from glyph_core.launch import METRICS_NAME, LogFileHandler, progress_writer
from glyph_core.storage import DatasetRef, Store
from glyph_core.trainer import train_sft


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m glyph_core.train_worker ARGS.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = json.loads(Path(argv[0]).read_text())
    cfg = TrainConfig.model_validate(args["cfg"])
    output_dir = Path(args["output_dir"])
    if os.environ.get("RANK", "0") == "0":  # the parent relays rank 0's lines to its own log
        logging.getLogger("glyph_core").addHandler(LogFileHandler(output_dir))
    rows: Any
    store = None
    if "sft_ref" in args:
        store = Store(args["store"])
        rows = DatasetRef.model_validate(args["sft_ref"])
    else:
        rows = pq.read_table(args["rows_path"])

    result = train_sft(
        rows,
        cfg,
        output_dir,
        store=store,
        data_sha256=args.get("data_sha256"),
        keep_model=False,
        progress=progress_writer(output_dir),  # rank 0 only (the trainer's callback checks)
    )
    if result.manifest:  # rank 0 only (the other ranks return an empty manifest)
        pq.write_table(result.metrics, output_dir / METRICS_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
