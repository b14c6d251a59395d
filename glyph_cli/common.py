"""What every `glyph` command shares: the error line, the console, the store option, `--debug`.

A failure a person can act on ends a command with one `error:` line that names the file, field
or endpoint and what to do, and exit code 1 (2 for a bad setting caught before anything ran).
`explain` knows which failures those are: the project's own (`GlyphError`, `StorageError`), a
config model's validation, text that is not UTF-8, object storage and the Prefect API. The
traceback is printed only with `--debug` (or `GLYPH_DEBUG=1`); inside a pipeline run it is also
in the Prefect run's logs. Anything else is a bug, and Python prints its traceback.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from typing import Annotated, NoReturn

import aiohttp
import botocore.exceptions as boto
import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from glyph_core.config import invalid_settings
from glyph_core.errors import GlyphError, StorageError
from glyph_core.storage import s3_endpoint

console = Console(stderr=True)

DEBUG_ENV = "GLYPH_DEBUG"


StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store", help="local directory or s3://bucket/prefix (default $GLYPH_STORE or .glyph/store)"
    ),
]
DebugOpt = Annotated[
    bool,
    typer.Option("--debug", envvar=DEBUG_ENV, help="show the traceback of a failure ($GLYPH_DEBUG=1)"),
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="no Prefect logs in the terminal: the summary, or one error line"),
]
ServerOpt = Annotated[
    bool,
    typer.Option(
        "--server/--no-server",
        envvar="GLYPH_SERVER",
        help="without PREFECT_API_URL: start/reuse a local Prefect server (UI on :4200), "
        "or use Prefect's temporary in-process one",
    ),
]


def set_debug(on: bool) -> None:
    """`--debug` anywhere on the command line (before or after the command) turns it on."""
    if on:
        os.environ[DEBUG_ENV] = "1"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _prefect_api(exc: httpx.HTTPError) -> str:
    try:
        url = exc.request.url
        where = f"{url.scheme}://{url.netloc.decode()}"
    except RuntimeError:  # an error raised before the request was built
        where = "the configured PREFECT_API_URL"
    if isinstance(exc, httpx.TimeoutException):
        limit = os.environ.get("PREFECT_API_REQUEST_TIMEOUT", "60")
        return (
            f"the Prefect API at {where} did not answer within {limit} s ({type(exc).__name__}): "
            "check the server's health (`glyph server status`); PREFECT_API_REQUEST_TIMEOUT raises the limit"
        )
    if isinstance(exc, httpx.HTTPStatusError):
        return (
            f"the Prefect API at {where} answered {exc.response.status_code} to "
            f"{exc.request.method} {exc.request.url.path}: check the server's log (`glyph server status`)"
        )
    return (
        f"the Prefect API at {where} cannot be reached ({type(exc).__name__}: {_one_line(str(exc))}): "
        "start it (`glyph server start`), point PREFECT_API_URL at a running one, or unset it "
        "to let `glyph run` start its own"
    )


def _object_storage(exc: BaseException) -> str:
    endpoint = s3_endpoint()
    where = f"S3 endpoint {endpoint}" if endpoint else "AWS S3 (no AWS_ENDPOINT_URL set)"
    return (
        f"object storage request to {where} failed ({type(exc).__name__}: {_one_line(str(exc))[:300]}): "
        "check AWS_ENDPOINT_URL, the credentials (AWS_ACCESS_KEY_ID) and the bucket"
    )


def _line(exc: BaseException) -> str | None:
    """One line for a failure this module knows, else None."""
    if isinstance(exc, GlyphError | StorageError):
        return str(exc)
    if isinstance(exc, ValidationError):
        return str(invalid_settings(exc))
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"not {exc.encoding} text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start} "
            f"({exc.reason}); a binary or compressed file where text was expected (--debug shows where)"
        )
    if isinstance(exc, httpx.HTTPError):
        return _prefect_api(exc)
    if isinstance(exc, boto.BotoCoreError | boto.ClientError | aiohttp.ClientError):
        return _object_storage(exc)
    if isinstance(exc, OSError):
        if exc.filename is not None:
            return f"{exc.filename}: {exc.strerror or exc}: check the path and its permissions"
        return f"{type(exc).__name__}: {exc}"
    return None


def explain(exc: BaseException) -> str | None:
    """The `error:` line for `exc` (or for the known error it was raised from), None for a bug."""
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        line = _line(err)
        if line is not None:
            return _one_line(line)
        err = err.__cause__
    return None


def fail(exc: BaseException | str, code: int = 1) -> NoReturn:
    """Print one `error:` line naming what is wrong and exit with `code`."""
    text = exc if isinstance(exc, str) else (explain(exc) or f"{type(exc).__name__}: {exc}")
    console.print(f"[bold red]error:[/] {escape(_one_line(text))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=code)


@contextlib.contextmanager
def reported_errors(code: int = 1) -> Iterator[None]:
    """Inside: a known failure becomes one `error:` line and exit `code` (with `--debug`, its
    traceback first); anything else propagates with its traceback, since it is a bug."""
    try:
        yield
    except Exception as exc:
        line = explain(exc)
        if line is None:
            raise
        if debug_enabled():
            console.print("".join(traceback.format_exception(exc)), highlight=False, markup=False)
        fail(line, code)
