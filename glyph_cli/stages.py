"""CPU stage commands on plain Parquet files: `glyph unify`, `glyph filter`, `glyph rewrite`.

They run one stage outside the pipeline (no Prefect, no store), for inspection and debugging.
Outputs are written to a temporary sibling and renamed into place only after the stage
succeeded, so a failing run never damages an existing output file.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.parquet as pq
import typer
from pydantic import ValidationError as ConfigError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from glyph_core.errors import GlyphError

console = Console(stderr=True)


def default_data_dir() -> Path | None:
    """``$GLYPH_DATA_DIR``, else ``../shared/data`` when it exists, else None (the Hub)."""
    env = os.environ.get("GLYPH_DATA_DIR")
    if env:
        return Path(env)
    local = Path("..") / "shared" / "data"
    return local if local.is_dir() else None


def write_parquet(table: pa.Table, path: Path) -> None:
    """Atomic: write a temporary sibling, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_parquet(path: Path, what: str) -> pa.Table:
    if not path.is_file():
        raise GlyphError(f"{what} file not found: {path}")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise GlyphError(f"{path}: not a readable Parquet file ({exc})") from None


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
    return typer.Exit(code=1)


def _summary(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{v:,}" if isinstance(v, int) else str(v) for v in r])
    console.print(table)


OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output Parquet file (written atomically).")]


def unify_cmd(
    out: OutOpt = Path("problems.parquet"),
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder in the upstream layout (gsm8k/, svamp/, math/). Default: $GLYPH_DATA_DIR, "
            "else ../shared/data if present, else the Hugging Face Hub."
        ),
    ] = None,
    sources: Annotated[
        list[str] | None, typer.Option("--source", "-s", help="Source to include (repeat). Default: all.")
    ] = None,
    svamp_holdout: Annotated[int, typer.Option(help="SVAMP rows held out by id hash.")] = 300,
    max_train: Annotated[int | None, typer.Option(help="At most this many training rows per source.")] = None,
    max_test: Annotated[int | None, typer.Option(help="At most this many held-out rows per source.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the subsampling hash.")] = 0,
) -> None:
    """Unify GSM8K, SVAMP and MATH into one problems table (splits, difficulty, buckets, dedup)."""
    from glyph_core.config import UnifyConfig
    from glyph_core.sources import SOURCES, unknown_source
    from glyph_core.unify import unify

    root = data_dir if data_dir is not None else default_data_dir()
    try:
        for name in sources or []:
            if name not in SOURCES:
                raise unknown_source(name)
        cfg = UnifyConfig(
            data_dir=str(root) if root else None,
            **({"sources": sources} if sources else {}),  # type: ignore[arg-type]
            svamp_holdout=svamp_holdout,
            max_train_per_source=max_train,
            max_test_per_source=max_test,
            seed=seed,
        )
        t = time.perf_counter()
        with console.status(f"unifying from {root or 'the Hugging Face Hub'} ..."):
            result = unify(cfg)
        write_parquet(result.table, out)
    except (GlyphError, ConfigError) as exc:
        raise _fail(exc) from None
    _summary(
        f"{result.table.num_rows:,} problems -> {out} ({time.perf_counter() - t:.1f} s)",
        ["source", "split", "bucket", "rows"],
        [[r["source"], r["split"], r["bucket"], r["rows"]] for r in result.summary()],
    )
    _summary("dropped", ["reason", "rows"], [[k, v] for k, v in result.dropped.items()])


def filter_cmd(
    traces: Annotated[Path, typer.Option(help="Traces Parquet from the generate stage.")],
    problems: Annotated[Path, typer.Option(help="Problems Parquet from `glyph unify`.")],
    out: OutOpt = Path("kept.parquet"),
    drops: Annotated[
        Path | None, typer.Option(help="Also write the drop table (reason, count) here.")
    ] = None,
    max_completion_tokens: Annotated[
        int, typer.Option(help="Longer completions are dropped as too_long.")
    ] = 1024,
    workers: Annotated[int, typer.Option(help="Answer-checking processes; 0 = one per core.")] = 0,
    natural: Annotated[
        bool, typer.Option("--natural", help="Natural-prompt traces: skip the glyph check.")
    ] = False,
) -> None:
    """Keep complete, well-formed, correct, distinct traces; count drops by reason."""
    from glyph_core.config import FilterConfig
    from glyph_core.filter import filter_traces

    try:
        cfg = FilterConfig(max_completion_tokens=max_completion_tokens, workers=workers)
        tr, pr = read_parquet(traces, "traces"), read_parquet(problems, "problems")
        with Progress(
            TextColumn("filter"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
        ) as bar:
            task = bar.add_task("filter", total=tr.num_rows)
            result = filter_traces(
                tr, pr, cfg, require_structure=not natural, progress=lambda n: bar.advance(task, n)
            )
        write_parquet(result.kept, out)
        if drops is not None:
            write_parquet(result.drops, drops)
    except (GlyphError, ConfigError) as exc:
        raise _fail(exc) from None
    counts = result.drop_counts()
    _summary(
        f"kept {result.kept.num_rows:,} of {tr.num_rows:,} traces -> {out}",
        ["reason", "dropped"],
        [[k, v] for k, v in counts.items()],
    )


def rewrite_cmd(
    kept: Annotated[Path, typer.Option(help="Kept glyph traces from `glyph filter`.")],
    problems: Annotated[Path, typer.Option(help="Problems Parquet from `glyph unify`.")],
    out: OutOpt = Path("sft.parquet"),
    natural: Annotated[Path | None, typer.Option(help="Kept natural-prompt generations (optional).")] = None,
    glyph_min_bucket: Annotated[
        str, typer.Option(help="easy, medium or hard: lowest bucket trained on glyph traces.")
    ] = "hard",
    natural_ratio: Annotated[float, typer.Option(help="Natural rows per glyph row.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the selection and the shuffle.")] = 0,
) -> None:
    """Build SFT chat rows: latent prompt -> glyph trace (hard) or natural answer (easy)."""
    from glyph_core.config import RewriteConfig
    from glyph_core.rewrite import rewrite

    try:
        cfg = RewriteConfig(glyph_min_bucket=glyph_min_bucket, natural_ratio=natural_ratio, seed=seed)  # type: ignore[arg-type]
        nat = read_parquet(natural, "natural generations") if natural is not None else None
        result = rewrite(read_parquet(kept, "kept traces"), read_parquet(problems, "problems"), cfg, nat)
        write_parquet(result.table, out)
    except (GlyphError, ConfigError) as exc:
        raise _fail(exc) from None
    _summary(
        f"{result.table.num_rows:,} SFT rows -> {out}",
        ["part", "rows"],
        [[k, v] for k, v in result.stats.items()],
    )


def register(app: typer.Typer) -> None:
    """Add the CPU stage commands to the `glyph` app."""
    app.command("unify")(unify_cmd)
    app.command("filter")(filter_cmd)
    app.command("rewrite")(rewrite_cmd)
