"""Error types. `GlyphError` marks bad input or bad configuration: retrying cannot fix it, so the
Prefect tasks never retry on it, while storage and network errors are retried."""

from __future__ import annotations


class GlyphError(Exception):
    """Bad input or configuration; the message names the file, row or field."""


class ValidationError(GlyphError):
    """An input violates a documented contract (schema, value range, config)."""


class SettingError(ValidationError):
    """A setting is unknown, of the wrong type or out of range; the message names its dotted
    path as a user writes it (`train.learning_rate=-1: must be > 0`)."""


class SchemaError(ValidationError):
    """A table lacks columns a stage needs, or refers to rows that do not exist."""


class SourceError(ValidationError):
    """A dataset source file or record is unusable.

    The message names the file (or Hub id), the 1-based line (JSON Lines) or the 0-based row
    (a JSON list, a Hub split), and the offending field, so a person can open the file and fix it.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        parts = [str(path)] if path is not None else []
        if line is not None:
            parts.append(f"line {line}")
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field {field!r}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path, self.line, self.row, self.field = path, line, row, field


class LeakageError(GlyphError):
    """A held-out question reached training data."""


class ErrorBudgetExceeded(GlyphError):
    """Too much of a stage's work failed (a dead teacher endpoint, a broken model): the stage
    fails before publishing, so a failure is never cached as a result."""


class EndpointError(GlyphError):
    """A service the configuration points at (a teacher endpoint) cannot be used; the message
    names the endpoint and what to check, never a credential."""


class StorageError(Exception):
    """Reading or writing an artifact failed; the message names the path or endpoint.

    `transient` says whether trying again can succeed: a connection that failed, a request that
    timed out, a server that asked to slow down. A read-only store, a root that is a file, denied
    credentials or a corrupt artifact stay as they are however often one retries, so the tasks
    retry only a transient one (tasks/caching.py).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
