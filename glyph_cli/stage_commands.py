"""`glyph <stage>`: one command per declared stage, generated from its declaration
(glyph_core/stages.py) and its config model, so no option is copied by hand and no default can
drift from the model.

Each command runs the stage's own runner, the one the pipeline's task runs, outside Prefect:

    glyph <stage> [--profile P] --<input> PATH ... [--out DIR] [--store DIR] [--<setting> VALUE ...]

- one option per input ref the stage declares: a Parquet file, or for a model input a model
  directory (a `glyph train` output) or a base model name;
- one option per config field, nested fields joined by `-` (`--teacher-backend`, `--lora-r`),
  with the field's description as help and the model's default shown; an option left out keeps
  the default, or the `--profile`'s value when one is given. Values are parsed like `--set`
  (JSON where it parses) and validated by the config model itself;
- the stage writes into the store (`--store`, the same default as `glyph run`), so a rerun
  resumes where it stopped (generate's shards, train's checkpoints), and every declared output
  is then copied to `--out` under its name (`traces.parquet`, `model/`, ...).
"""

from __future__ import annotations

import inspect
import logging
import shutil
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import TypeAdapter
from pydantic import ValidationError as ConfigError
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from glyph_cli.common import DEBUG_ENV, console, reported_errors, set_debug
from glyph_cli.run_summary import print_evaluation
from glyph_core.config import StrictModel, invalid_settings
from glyph_core.errors import GlyphError
from glyph_core.outputs import Ref, StageOutput, import_model, import_table
from glyph_core.profiles import PROFILES, default_store_root, load_profile, parse_value
from glyph_core.stages import Stage, stages
from glyph_core.storage import DatasetRef, ModelRef, Store

# ---------------------------------------------------------------------------------------------
# config fields -> options


class Setting(typing.NamedTuple):
    """One leaf field of a stage config: its dotted path, type, default and help."""

    path: str
    annotation: Any
    default: Any
    help: str

    @property
    def option(self) -> str:
        return "--" + self.path.replace(".", "-").replace("_", "-")

    @property
    def param(self) -> str:
        return "set__" + self.path.replace(".", "__")


def settings(model: type[StrictModel], prefix: str = "") -> Iterator[Setting]:
    """Every leaf field of `model`, nested configs flattened (`teacher.max_new_tokens`)."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, StrictModel):
            yield from settings(annotation, f"{path}.")
        else:
            yield Setting(
                path, annotation, field.get_default(call_default_factory=True), field.description or ""
            )


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def _metavar(annotation: Any) -> str:
    choices = _choices(annotation)
    if choices:
        return "[" + "|".join(choices) + "]"
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return f"{_metavar(item).strip('[]').replace('|', ',')},..."
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    names = {int: "INT", float: "FLOAT", str: "TEXT", bool: "BOOL"}
    return "|".join(names.get(a, "VALUE") for a in args) + (
        "|null" if type(None) in typing.get_args(annotation) else ""
    )


def field_parser(setting: Setting) -> Callable[[Any], Any]:
    """A config field's value from the command line: parsed like `--set`, validated by pydantic
    against the field's own type, so the option accepts exactly what the model accepts."""
    adapter: TypeAdapter[Any] = TypeAdapter(setting.annotation)

    def parse(value: Any) -> Any:
        try:
            return adapter.validate_python(parse_value(value) if isinstance(value, str) else value)
        except ConfigError as exc:
            raise typer.BadParameter(
                f"{value!r} is not a valid {setting.path}: {exc.errors()[0]['msg']}"
            ) from None

    return parse


def setting_parameter(setting: Setting) -> inspect.Parameter:
    """The typer option of one setting, with the model's default (shown in the help). Only the
    options given on the command line override the profile (`given_settings`)."""
    kind = inspect.Parameter.KEYWORD_ONLY
    if setting.annotation is bool:
        flags = f"{setting.option}/{setting.option.replace('--', '--no-', 1)}"
        return inspect.Parameter(
            setting.param,
            kind,
            default=typer.Option(setting.default, flags, help=setting.help),
            annotation=bool,
        )
    option = typer.Option(
        setting.default,
        setting.option,
        help=setting.help + (r" \[default: null]" if setting.default is None else ""),
        parser=field_parser(setting),
        metavar=_metavar(setting.annotation),
    )
    return inspect.Parameter(setting.param, kind, default=option, annotation=Any)


def given_settings(
    ctx: typer.Context, leaf_settings: list[Setting], values: dict[str, Any]
) -> dict[str, Any]:
    """`{dotted path: value}` of the settings given on the command line."""
    return {
        s.path: values[s.param]
        for s in leaf_settings
        if getattr(ctx.get_parameter_source(s.param), "name", None) == "COMMANDLINE"  # typer vendors click
    }


def build_config(stage: Stage, profile: str | None, given: dict[str, Any]) -> StrictModel:
    """The profile's config for `stage` (or the model's defaults) with the given settings."""
    base = load_profile(profile).stage_config(stage.name) if profile else stage.config()
    data = base.model_dump(mode="json")
    for path, value in given.items():
        node = data
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return stage.config.model_validate(data)
    except ConfigError as exc:
        raise invalid_settings(exc, prefix=stage.name) from exc


# ---------------------------------------------------------------------------------------------
# inputs and outputs


def input_kinds(stage: Stage) -> dict[str, type]:
    """`{input name: DatasetRef or ModelRef}`, read from the runner's annotations."""
    hints = typing.get_type_hints(stage.run)
    return {name: hints[name] for name in stage.inputs}


def input_parameter(name: str, kind: type) -> inspect.Parameter:
    if kind is ModelRef:
        help_ = "model directory (e.g. a `glyph train` output's model/) or a base model name"
    else:
        help_ = f"{name} Parquet file (a `glyph` command's {name}.parquet)"
    option = typer.Option(..., f"--{name.replace('_', '-')}", help=help_)
    return inspect.Parameter(f"in__{name}", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=str)


def import_input(store: Store, kind: type, value: str) -> Ref:
    return import_model(store, value) if kind is ModelRef else import_table(store, Path(value))


def export_outputs(store: Store, out: StageOutput, out_dir: Path) -> dict[str, Path]:
    """Copy every declared output to `out_dir` under its name (tables as `<name>.parquet`,
    models as `<name>/`), each published by a rename so a failed copy leaves nothing half-written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, ref in out.refs.items():
        if isinstance(ref, DatasetRef):
            path = out_dir / f"{name}.parquet"
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(store.read_bytes(ref.uri))
            tmp.replace(path)
        else:
            path = out_dir / name
            tmp = out_dir / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(store.get_dir(ref), tmp)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        written[name] = path
    return written


# ---------------------------------------------------------------------------------------------
# the command


def _print_output(stage: Stage, store: Store, out: StageOutput, written: dict[str, Path]) -> None:
    s = out.stats
    table = Table(
        title=f"{stage.name}: {s.rows_in:,} rows in -> {s.rows_out:,} out in {s.seconds:.1f} s",
        show_header=False,
    )
    table.add_column("", style="bold")
    table.add_column("")
    for name, path in written.items():
        table.add_row(name, str(path))
    for reason, n in s.drops.items():
        table.add_row(f"dropped: {reason}", f"{n:,}")
    if not s.drops:
        table.add_row("dropped", "none")
    for name, value in s.extra.items():
        table.add_row(name, str(value))
    table.add_row("store", store.uri(stage.name, out.key))
    console.print(table)
    if stage.name == "evaluate":  # the table people look for, as `glyph run` prints it
        row = {"stage": stage.name, "key": out.key, "refs": {k: r.uri for k, r in out.refs.items()}}
        print_evaluation({"store": store.root, "stages": [row]}, console)


def _log_to_console() -> None:
    """The stages' progress lines (train: one per logged step, evaluate: one per batch)."""
    logger = logging.getLogger("glyph_core")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False, show_level=False))


def stage_command(stage: Stage) -> Callable[..., None]:
    """The `glyph <stage>` command function (its signature is what typer reads)."""
    kinds = input_kinds(stage)
    leaf_settings = list(settings(stage.config))

    def command(ctx: typer.Context, **kwargs: Any) -> None:
        set_debug(kwargs["debug"])
        given = given_settings(ctx, leaf_settings, kwargs)
        out_dir = Path(kwargs["out"])
        _log_to_console()
        with reported_errors():
            cfg = build_config(stage, kwargs["profile"], given)
            store = Store(kwargs["store"] or default_store_root()).ensure()
            refs = {name: import_input(store, kind, kwargs[f"in__{name}"]) for name, kind in kinds.items()}
            with Progress(
                TextColumn(f"[bold]{stage.name}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task(stage.name, total=None)
                out = stage.run_with(
                    store, cfg, refs, lambda done, total: bar.update(task, completed=done, total=total)
                )
            written = export_outputs(store, out, out_dir)
        _print_output(stage, store, out, written)

    kind = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += [input_parameter(name, k) for name, k in kinds.items()]
    params += [
        inspect.Parameter(
            "out",
            kind,
            default=typer.Option(
                Path("."), "--out", "-o", help="folder for the outputs (each under its name)"
            ),
            annotation=Path,
        ),
        inspect.Parameter(
            "store",
            kind,
            default=typer.Option(
                None,
                "--store",
                help="where the stage works and resumes (default $GLYPH_STORE or .glyph/store)",
            ),
            annotation=str | None,
        ),
        inspect.Parameter(
            "profile",
            kind,
            default=typer.Option(
                None,
                "--profile",
                "-p",
                help=f"start from this profile's {stage.name} settings ({' | '.join(PROFILES)}) instead of the defaults below",
            ),
            annotation=str | None,
        ),
        inspect.Parameter(
            "debug",
            kind,
            default=typer.Option(False, "--debug", envvar=DEBUG_ENV, help="show the traceback of a failure"),
            annotation=bool,
        ),
    ]
    seen: set[str] = set()
    for setting in leaf_settings:
        if setting.option in seen or setting.option in {
            "--out",
            "--store",
            "--profile",
            "--debug",
            *(f"--{n}" for n in kinds),
        }:
            raise GlyphError(f"glyph {stage.name}: option {setting.option} is declared twice")
        seen.add(setting.option)
        params.append(setting_parameter(setting))
    command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = f"{stage.name}_cmd"
    command.__doc__ = stage.help
    return command


def register(app: typer.Typer) -> None:
    """One `glyph <stage>` command per declared stage."""
    for stage in stages():
        app.command(stage.name, help=stage.help)(stage_command(stage))
