"""Test hooks, inert unless their environment variable is set: count real stage executions and
inject faults. Driven by the environment so they also work in subprocesses and in the worker
processes of a real Prefect server (tests/integration).

Both run where a stage actually runs (`tasks.dispatch.run_here`): in the task's process for an
inline stage, in the child flow run for a dispatched GPU stage. A cached task never gets there,
so the execution log counts real work, and a fault armed for `train` fires in the run that
trains, not in the parent that waits for it.

Faults: with `GLYPH_FAULT_DIR` set, a stage that finds `{dir}/{stage}.{kind}` deletes it (so
it fires once) and then
- `transient`: raises `ConnectionError` (retried by the task),
- `fatal`: raises `GlyphError` (not retried; a GPU child ends Failed),
- `crash`: SIGKILLs its own process, as the OOM killer would (no handler, no clean-up).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from glyph_core.errors import GlyphError

EXEC_LOG_ENV = "GLYPH_TEST_EXEC_LOG"
FAULT_DIR_ENV = "GLYPH_FAULT_DIR"
KINDS = ("transient", "fatal", "crash")

log = logging.getLogger(__name__)


def record_execution(stage: str) -> None:
    path = os.environ.get(EXEC_LOG_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(f"{stage}\n")


def inject_fault(stage: str) -> None:
    fault_dir = os.environ.get(FAULT_DIR_ENV)
    if not fault_dir:
        return
    for kind in KINDS:
        armed = Path(fault_dir) / f"{stage}.{kind}"
        try:
            armed.unlink()  # consumed: fires once, even with concurrent runs
        except FileNotFoundError:
            continue
        log.warning("%s: injecting a %s fault into %s", FAULT_DIR_ENV, kind, stage)
        if kind == "transient":
            raise ConnectionError(f"injected transient failure in {stage}")
        if kind == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        raise GlyphError(f"injected failure in {stage} ({armed})")
