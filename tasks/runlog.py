"""The run log: where a stage's own log lines (`glyph_core.*` loggers: train's "step 5/40 loss
…", evaluate's generation batches) reach the Prefect UI, however the flow was started.

Prefect sends a logger's records to the API only when it is named in
`PREFECT_LOGGING_EXTRA_LOGGERS` in the environment of the process, which a deployment's worker,
a test and `glyph run` would each have to set. Instead, `relay_stage_logs()` (called where a
stage runs: the pipeline's tasks and the GPU child flows) does what that setting does: it hangs
Prefect's API log handler on the `glyph_core` logger, so each record reaches the run it was
emitted in (the console still gets it through the root logger, once). A record emitted outside
a run (a thread without the run's context) is dropped quietly rather than warned about. Where
the setting already put Prefect's handler there, nothing is added, so no line is sent twice.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

DOMAIN_LOGGER = "glyph_core"
log = logging.getLogger(__name__)


def run_logger() -> Any:
    """Prefect's run logger inside a flow or task run, this module's logger outside one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


class RunLogRelay(APILogHandler):
    """Prefect's API log handler, silent for records emitted outside a flow or task run."""

    def emit(self, record: logging.LogRecord) -> None:
        if get_run_context_or_none() is None:
            return
        super().emit(record)


def get_run_context_or_none() -> Any:
    try:
        return get_run_context()
    except MissingContextError:
        return None


def relay_stage_logs() -> None:
    """Send the `glyph_core` loggers' INFO lines to the run log from now on (idempotent)."""
    logger = logging.getLogger(DOMAIN_LOGGER)
    if logger.level == logging.NOTSET:  # a level someone chose (`glyph run -q`) is kept
        logger.setLevel(logging.INFO)
    if any(isinstance(h, APILogHandler) for h in logger.handlers):
        return
    logger.addHandler(RunLogRelay())
