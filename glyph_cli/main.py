"""The `glyph` command: one entry for people, each stage's commands in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="glyph",
    help="Promptless glyph emergence: unify, generate, filter, rewrite, train, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Imported here so `glyph --help` stays fast and each module owns its commands.
    from glyph_cli import deploy, generate, pipeline, report, server, stages, train

    for module in (stages, generate, train, pipeline, report, server, deploy):
        module.register(app)


_register()

if __name__ == "__main__":
    app()
