"""The train stage: key, work directory, publish (docs/design.md, "Train").

Three layers, each importing only the one below: this stage calls the launcher
(`glyph_core.launch`: in this process, or `accelerate launch` for several GPUs), which calls
the trainer (`glyph_core.trainer.train_sft`: TRL + PEFT). The trainer knows nothing of keys or
stores; this module knows nothing of how training is started.

The work directory is derived from the key under the system temp dir, so a crashed run retried
on the same host resumes from its checkpoints; the model is published under
`train/{key}/model` (manifest written last) with `train/{key}/metrics.parquet` beside it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from glyph_core.config import TrainConfig
from glyph_core.launch import run_training
from glyph_core.outputs import Progress, StageOutput, StageStats, Timer
from glyph_core.storage import DatasetRef, Store, stage_key
from glyph_core.trainer import VERSION


def key(cfg: TrainConfig, *, sft: DatasetRef) -> str:
    return stage_key("train", VERSION, {"sft": sft.sha256}, cfg.key_dump())


def work_dir_for(out_key: str) -> Path:
    """Where checkpoints live while the stage runs: the same place for the same key."""
    return Path(tempfile.gettempdir()) / "glyph-train" / out_key


def run(
    store: Store,
    cfg: TrainConfig,
    *,
    sft: DatasetRef,
    progress: Progress | None = None,
    work_dir: str | Path | None = None,
) -> StageOutput:
    """Fine-tune the student; the model directory is published with its manifest last."""
    timer = Timer()
    out_key = key(cfg, sft=sft)
    work = Path(work_dir) if work_dir else work_dir_for(out_key)
    work.mkdir(parents=True, exist_ok=True)
    result = run_training(sft, cfg, work, store=store, keep_model=False, progress=progress)
    metrics = store.write_table(result.metrics, "train", out_key, "metrics.parquet")
    model = store.put_dir(result.model_dir, "train", out_key, cfg.base_model, result.kind)
    shutil.rmtree(work, ignore_errors=True)
    return StageOutput(
        stage="train",
        key=out_key,
        refs={"model": model, "metrics": metrics},
        stats=StageStats(
            rows_in=sft.rows,
            rows_out=1,
            seconds=timer.seconds,
            extra={"kind": model.kind, "base_model": model.base_model},
        ),
    )
