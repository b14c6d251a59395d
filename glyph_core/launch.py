"""The launcher: `train_sft` in this process, or on every rank of `accelerate launch`.

It sits between the trainer (`glyph_core.trainer`, which knows nothing of how it is started)
and the train stage (`glyph_core.train`, which keys and publishes), as TRL's CLI sits above its
`sft.py` script (docs/design.md, "Train").

Why a child process: data-parallel training needs one process per GPU, started with the world
size, ranks and rendezvous that `accelerate launch` sets up (DDP by default; FSDP or DeepSpeed
through an accelerate config file named in ``GLYPH_ACCELERATE_CONFIG``). The child runs
:mod:`glyph_core.train_worker`, which calls the same :func:`glyph_core.trainer.train_sft` with the
same config and output directory, so the checkpoints (``output_dir/checkpoints``) and the final
artifact (``output_dir/model`` with its manifest) have the one-process layout, and a rerun
resumes from the last checkpoint exactly as the inline path does. Only rank 0 writes the
artifact; the parent reads it back once every rank has exited.

``TrainConfig.launcher``: ``auto`` trains in this process for ``num_gpus == 1`` and launches
for more; ``accelerate`` forces the launch (one process on CPU in the tests); ``inline`` forces
the in-process path (one GPU only).

Progress: rank 0 of the child writes ``output_dir/progress.json`` after every step; the parent
polls it while the child runs and hands it to its own ``progress`` callback, so the train
stage's progress artifact moves on several GPUs as it does in one process. Log lines likewise:
rank 0 appends its ``glyph_core`` records (the trainer's "step 5/40 loss …") to
``output_dir/log.jsonl`` and the parent logs each again under the same logger, so they reach
the run log as they do from an inline training.

NVLink multicast stays off in the child (NCCL_NVLS_ENABLE=0 and friends): the lent hosts'
documentation asks for it, and DDP's all-reduce does not need it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from glyph_core.config import TrainConfig
from glyph_core.errors import GlyphError
from glyph_core.storage import DatasetRef, Store
from glyph_core.trainer import MANIFEST_NAME, MODEL_SUBDIR, RUN_NAME, StepProgress, TrainResult, train_sft

log = logging.getLogger(__name__)

ARGS_NAME = "launch.json"
METRICS_NAME = "metrics.parquet"
ROWS_NAME = "sft.parquet"
PROGRESS_NAME = "progress.json"
LOG_NAME = "log.jsonl"
PROGRESS_POLL_S = 1.0
ENV_CONFIG = "GLYPH_ACCELERATE_CONFIG"
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def uses_launcher(cfg: TrainConfig) -> bool:
    if cfg.launcher == "accelerate":
        return True
    if cfg.launcher == "inline":
        if cfg.num_gpus > 1:
            raise GlyphError(f"launcher='inline' cannot train on num_gpus={cfg.num_gpus}; use 'auto'")
        return False
    return cfg.num_gpus > 1


def _on_cpu(cfg: TrainConfig) -> bool:
    if cfg.device:
        return cfg.device == "cpu"
    import torch  # slow to import; only a launch without an explicit device needs it

    return not torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accelerate_command(cfg: TrainConfig, args_path: Path) -> list[str]:
    """`python -m accelerate.commands.launch ... -m glyph_core.train_worker ARGS` for this config."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    config_file = os.environ.get(ENV_CONFIG)
    if config_file:  # FSDP / DeepSpeed ZeRO: the file says how; the world size comes from cfg
        cmd += ["--config_file", config_file]
    cmd += ["--num_processes", str(cfg.num_gpus), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if cfg.num_gpus > 1:
        # torchrun with the world size; on CPU (tests) the ranks talk over gloo. Not `--cpu`:
        # with it accelerate starts a single process whatever --num_processes says.
        if not config_file:
            cmd.append("--multi_gpu")
        cmd += ["--main_process_port", str(_free_port())]
    elif _on_cpu(cfg):
        cmd.append("--cpu")
    return [*cmd, "-m", "glyph_core.train_worker", str(args_path)]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(NO_MULTICAST)
    root = str(Path(__file__).resolve().parents[1])  # so `-m glyph_core.train_worker` resolves
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def progress_writer(output_dir: str | Path) -> StepProgress:
    """The child's side: `progress(step, total)` published atomically as ``progress.json``."""
    path = Path(output_dir) / PROGRESS_NAME

    def write(step: int, total: int) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"step": step, "total": total}))
        os.replace(tmp, path)

    return write


class LogFileHandler(logging.Handler):
    """The child's side: each record as one JSON line (level, logger, message) in ``log.jsonl``."""

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(logging.INFO)
        self.path = Path(output_dir) / LOG_NAME

    def emit(self, record: logging.LogRecord) -> None:
        line = json.dumps({"level": record.levelno, "name": record.name, "message": record.getMessage()})
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except OSError:
            self.handleError(record)


def _relay_logs(path: Path, offset: int) -> int:
    """The parent's side: log the complete lines of ``log.jsonl`` after `offset`; the new offset."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    for raw in data[:end].splitlines():
        try:
            entry = json.loads(raw)
            logging.getLogger(str(entry["name"])).log(int(entry["level"]), "%s", entry["message"])
        except (ValueError, KeyError, TypeError):
            continue
    return offset + end


def _relay_progress(
    path: Path, progress: StepProgress | None, seen: tuple[int, int] | None
) -> tuple[int, int] | None:
    """The parent's side: hand a new ``progress.json`` on to `progress`; returns what it saw."""
    if progress is None or not path.exists():
        return seen
    try:
        data = json.loads(path.read_text())
        now = (int(data["step"]), int(data["total"]))
    except (OSError, ValueError, KeyError, TypeError):  # replaced while read: the next poll sees it
        return seen
    if now != seen:
        progress(*now)
    return now


def run_training(
    sft_rows: pa.Table | DatasetRef,
    cfg: TrainConfig,
    output_dir: str | Path,
    *,
    store: Store | None = None,
    data_sha256: str | None = None,
    keep_model: bool = True,
    progress: StepProgress | None = None,
) -> TrainResult:
    """`train_sft` in this process, or through `accelerate launch` (see `uses_launcher`); the
    arguments are `train_sft`'s. Launched, the `TrainResult` is read back from disk (``model``
    is None: the weights live in the child)."""
    if not uses_launcher(cfg):
        return train_sft(
            sft_rows,
            cfg,
            output_dir,
            store=store,
            data_sha256=data_sha256,
            keep_model=keep_model,
            progress=progress,
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    args: dict[str, Any] = {"cfg": cfg.model_dump(mode="json"), "output_dir": str(output_dir)}
    if isinstance(sft_rows, DatasetRef):
        if store is None:
            raise GlyphError("a DatasetRef needs the Store it lives in")
        args.update(store=store.root, sft_ref=sft_rows.model_dump(mode="json"))
    else:
        rows_path = output_dir / ROWS_NAME
        pq.write_table(sft_rows, rows_path)
        args["rows_path"] = str(rows_path)
    if data_sha256:
        args["data_sha256"] = data_sha256
    args_path = output_dir / ARGS_NAME
    args_path.write_text(json.dumps(args, indent=2, sort_keys=True))

    progress_path = output_dir / PROGRESS_NAME
    progress_path.unlink(missing_ok=True)
    log_path = output_dir / LOG_NAME
    log_path.unlink(missing_ok=True)
    log_offset = 0

    cmd = accelerate_command(cfg, args_path)
    log.info("launching %d training process(es): %s", cfg.num_gpus, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=child_env())
    seen: tuple[int, int] | None = None
    while True:
        try:
            returncode: int | None = proc.wait(timeout=PROGRESS_POLL_S)
        except subprocess.TimeoutExpired:
            returncode = None
        seen = _relay_progress(progress_path, progress, seen)
        log_offset = _relay_logs(log_path, log_offset)
        if returncode is not None:
            break
    if returncode != 0:
        raise RuntimeError(  # not a GlyphError: a retry resumes from the checkpoints
            f"accelerate launch exited {returncode}; rerun to resume from {output_dir}/checkpoints"
        )
    model_dir = output_dir / MODEL_SUBDIR
    manifest_path = model_dir / MANIFEST_NAME
    if not manifest_path.exists():
        raise RuntimeError(f"accelerate launch exited 0 but left no {manifest_path}")
    manifest = json.loads(manifest_path.read_text())
    metrics = pq.read_table(output_dir / METRICS_NAME)
    (output_dir / METRICS_NAME).unlink()
    run_path = output_dir / RUN_NAME
    run = json.loads(run_path.read_text()) if run_path.exists() else {}
    return TrainResult(
        model_dir=model_dir, manifest=manifest, metrics=metrics, kind=manifest["kind"], run=run
    )
