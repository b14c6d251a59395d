"""What every `glyph` command shares: the error line, the console, the store option."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from glyph_core.errors import GlyphError

console = Console(stderr=True)

USER_ERRORS: tuple[type[Exception], ...] = (GlyphError, ValidationError)
"""Bad input or configuration: one `error:` line and exit code 1, no traceback."""

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store", help="local directory or s3://bucket/prefix (default $GLYPH_STORE or .glyph/store)"
    ),
]


def fail(exc: BaseException | str, code: int = 1) -> NoReturn:
    """Print one `error:` line naming what is wrong and exit with `code`."""
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=code)
