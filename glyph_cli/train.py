"""GPU-stage commands on plain files: `glyph train` (SFT rows → model dir) and `glyph evaluate`
(held-out problems → base-vs-tuned table, metrics and plot). No Prefect, no store: for a person
running one stage by hand, and for the CPU demo with SmolLM2-135M."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError as ConfigError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from glyph_core.errors import GlyphError

console = Console(stderr=True)

BaseOpt = Annotated[
    str,
    typer.Option(help="Base model: a local dir, a Hub id, or an alias (smollm2-135m, tiny-random)."),
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's).")]


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
    return typer.Exit(code=1)


def _read(path: Path, what: str):  # type: ignore[no-untyped-def]
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise GlyphError(f"{what} file not found: {path}")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise GlyphError(f"{path}: not a readable Parquet file ({exc})") from None


def _progress_logging() -> None:
    handler = RichHandler(console=console, show_path=False, show_level=False)
    for name in ("glyph_core.train", "glyph_core.evaluate"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.INFO)
        if not lg.handlers:
            lg.addHandler(handler)


def train_cmd(
    sft: Annotated[Path, typer.Argument(help="SFT rows Parquet (messages, kind, id) from `glyph rewrite`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dir: model/ and checkpoints/.")] = Path(
        "run"
    ),
    base_model: BaseOpt = "smollm2-135m",
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimizer steps (-1: epochs).")] = -1,
    epochs: Annotated[float, typer.Option(help="Passes over the rows when --max-steps is -1.")] = 2.0,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha (default 2 x rank).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Full fine-tuning instead of LoRA.")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="Merge the LoRA adapter into full weights.")] = False,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Rows per device batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 4,
    max_seq_len: Annotated[int, typer.Option(help="Truncate rows to this many tokens.")] = 1024,
    packing: Annotated[bool, typer.Option("--packing", help="Pack rows into max-seq-len blocks.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing")] = False,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps (resume after a crash).")] = 50,
    seed: int = 0,
    threads: ThreadsOpt = None,
) -> None:
    """Fine-tune the base model on SFT rows (LoRA by default); rerun the same command to resume."""
    from glyph_core.config import LoraConfig, TrainConfig
    from glyph_core.train import train_sft

    _progress_logging()
    try:
        rows = _read(sft, "SFT rows")
        cfg = TrainConfig(
            base_model=base_model,
            method="full" if full else "lora",
            lora=LoraConfig(r=lora_r, alpha=lora_alpha if lora_alpha is not None else 2 * lora_r),
            epochs=epochs,
            max_steps=max_steps,
            learning_rate=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            max_seq_len=max_seq_len,
            packing=packing,
            gradient_checkpointing=gradient_checkpointing,
            merge=merge,
            seed=seed,
            num_threads=threads,
            save_steps=save_steps,
        )
        t = time.perf_counter()
        result = train_sft(rows, cfg, out, keep_model=False)
    except (GlyphError, ConfigError) as exc:
        raise _fail(exc) from None
    m = result.manifest["metrics"]
    table = Table(title=f"trained {result.kind} on {rows.num_rows} rows in {time.perf_counter() - t:.0f} s")
    for c in ("steps", "first loss", "final loss", "tokens", "tokens/s"):
        table.add_column(c, justify="right")
    table.add_row(
        str(m.get("steps")),
        f"{m.get('first_loss', float('nan')):.3f}",
        f"{m.get('final_loss', float('nan')):.3f}",
        f"{m.get('tokens_seen', 0):,.0f}",
        f"{m.get('tokens_per_s') or 0:,.0f}",
    )
    console.print(table)
    print(result.model_dir)


def _pct(r: dict, name: str) -> str:
    p = r[name]
    if p != p:
        return "–"
    return f"{100 * p:.1f}% [{100 * r[name + '_lo']:.0f}–{100 * r[name + '_hi']:.0f}]"


def evaluate_cmd(
    problems: Annotated[Path, typer.Argument(help="Problems Parquet from `glyph unify` (test split used).")],
    model: Annotated[Path | None, typer.Option(help="Tuned model or adapter dir (e.g. run/model).")] = None,
    base_model: BaseOpt = "smollm2-135m",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output dir for the tables, metrics and plot.")
    ] = Path("eval"),
    per_bucket: Annotated[
        int | None, typer.Option(help="Problems per (source, bucket); default all.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per problem.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate() batch.")] = 16,
    compare_base: Annotated[
        bool, typer.Option(help="Also evaluate the base model on the same problems.")
    ] = True,
    backend: Annotated[str, typer.Option(help="transformers or vllm.")] = "transformers",
    seed: int = 0,
    threads: ThreadsOpt = None,
) -> None:
    """Promptless evaluation: latent prompt, greedy; glyph emergence, structure, accuracy, tokens."""
    from glyph_core.config import EvalConfig
    from glyph_core.evaluate import display_rows, evaluate

    _progress_logging()
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        table = _read(problems, "problems")
        cfg = EvalConfig(
            per_bucket=per_bucket,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            compare_base=compare_base,
            backend=backend,  # type: ignore[arg-type]
            seed=seed,
        )
        t = time.perf_counter()
        with console.status("generating and scoring ..."):
            result = evaluate(table, cfg, out, base_model=base_model, model=model)
    except (GlyphError, ConfigError) as exc:
        raise _fail(exc) from None
    rich_table = Table(
        title=f"{result.metrics['n_problems']} held-out problems, {time.perf_counter() - t:.0f} s (95% Wilson CI)"
    )
    for c in ("bucket", "model", "n", "emergence", "valid", "accuracy", "tokens"):
        rich_table.add_column(c, justify="right" if c in ("n", "tokens") else "left")
    for r in display_rows(result.table):
        rich_table.add_row(
            r["group"],
            r["model"],
            str(r["n"]),
            _pct(r, "emergence"),
            _pct(r, "valid"),
            _pct(r, "accuracy"),
            f"{r['mean_tokens']:.0f}",
        )
    console.print(rich_table)
    for name, sel in ((k, v["selectivity"]) for k, v in result.metrics["models"].items()):
        d, a = sel["emergence_hard_minus_easy"], sel["auroc_glyph_vs_difficulty"]
        console.print(
            f"{name}: selectivity hard−easy = {'–' if d is None else f'{d:+.2f}'}, "
            f"AUROC(glyph use, difficulty) = {'–' if a is None else f'{a:.2f}'}"
        )
    console.print(f"plot: {result.paths['plot']}")
    print(result.paths["metrics"])


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("evaluate")(evaluate_cmd)
