"""The `glyph` command: one entry for people.

`glyph <stage>` for every declared stage (glyph_cli/stage_commands.py, generated from
glyph_core/stages.py), `glyph run` and `glyph report` for the pipeline, `glyph server`,
`glyph deploy` and `glyph model` for the machinery around it.
"""

from __future__ import annotations

import typer

from glyph_cli import deploy, models, pipeline, report, server, stage_commands, sweep
from glyph_cli.common import DebugOpt, set_debug

app = typer.Typer(
    name="glyph",
    help="Promptless glyph emergence: unify, generate, filter, rewrite, train, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(debug: DebugOpt = False) -> None:
    """Promptless glyph emergence: unify, generate, filter, rewrite, train, evaluate.

    A failure ends with one `error:` line naming the file, setting or endpoint; `--debug`
    (here or after the command) adds its traceback."""
    set_debug(debug)


for module in (stage_commands, pipeline, sweep, report, server, deploy, models):
    module.register(app)

if __name__ == "__main__":
    app()
