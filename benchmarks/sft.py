"""SFT throughput: our training configuration against the original glyph scripts', side by side.

    python benchmarks/sft.py                      # SmolLM2-135M on CPU, compare mode
    python benchmarks/sft.py --profile            # settings grid to size the CPU demo
    python benchmarks/sft.py --model Qwen/Qwen2.5-7B-Instruct --device cuda --steps 20 --seq-len 1024

*compare*: both configurations see the same rows and take the same number of optimizer steps
of 16 rows each (effective batch 16):

* ``original``: full fine-tuning, batch 1, gradient accumulation 16, padding per batch, no
  packing (the original scripts' configuration);
* ``ours``: LoRA (rank 16, all linear layers), batch 4 × accumulation 4, every speed setting
  ``auto`` (on a CPU: today's padded micro-batches of 4; on a GPU: what
  ``glyph_core.trainer.resolve_speed`` picks, see docs/gpu.md); ``--packing`` packs rows.

The Qwen2.5-7B-shaped GPU comparison of every speed switch is ``benchmarks/gpu.py`` (its SFT
section, ``benchmarks/gpu_sft.py``).

Speed is non-padding tokens per second and seconds per optimizer step, measured from the
trainer's own log history (:func:`glyph_core.trainer.metrics_table`); the first step is left out
of the rates (it pays for lazy initialisation). Rows are synthetic but realistic in length: a
question and a glyph trace whose token counts vary between 40 % and 100 % of ``--seq-len``, so
padding costs what it costs on real data. ``--rows`` uses a real SFT Parquet file instead.

*profile*: a small grid (threads, sequence length, LoRA rank, batch size) with LoRA and
accumulation 1, to size a demo's training on a small CPU machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glyph_core.config import LoraConfig, TrainConfig  # noqa: E402
from glyph_core.models import resolve_base_model  # noqa: E402
from glyph_core.trainer import train_sft  # noqa: E402

console = Console(width=160)  # a wide table also when the output is a file
G, P, S, T, F = "\U0001f71e", "\U0001f706", "\U0001f702", "\U0001f703", "\U0001f75e"


def synthetic_rows(tokenizer: Any, n: int, seq_len: int, seed: int = 0) -> pa.Table:
    """Chat rows whose tokenized length is spread over [0.4, 1.0] × seq_len."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        target = int(seq_len * rng.uniform(0.4, 1.0))
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        question = f"A shop sells {a} pens a day for {b} days. How many pens does it sell in total?"
        parts = [
            f"{G} Multiply the daily amount by the number of days.",
            f"{P} Compute {a} x {b} step by step.",
        ]
        text = "\n".join(parts)
        k = 0
        while len(tokenizer(question + text)["input_ids"]) < target - 16:
            k += 1
            text += f"\n{S} Step {k}: {a} x {k} = {a * k}, and adding {b} gives {a * k + b}."
        text += f"\n{T} The total is {a * b}.\n{F} {a * b}"
        rows.append(
            {
                "id": f"bench-{i}",
                "kind": "glyph",
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": text}],
            }
        )
    return pa.Table.from_pylist(rows)


def measure(name: str, rows: pa.Table, cfg: TrainConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="glyph-bench-") as tmp:
        t = time.perf_counter()
        result = train_sft(rows, cfg, Path(tmp), keep_model=False)
        wall = time.perf_counter() - t
    m = result.metrics.to_pylist()
    steady = m[1:] if len(m) > 1 else m
    tokens = (
        sum(r["tokens_seen"] - p["tokens_seen"] for p, r in zip(m, m[1:], strict=False)) if len(m) > 1 else 0
    )
    secs = sum(r["interval_s"] for r in steady)
    return {
        "name": name,
        "method": cfg.method,
        "lora_r": cfg.lora.r if cfg.method == "lora" else None,
        "batch": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "packing": cfg.packing,
        "speed": None if result.speed is None else result.speed.__dict__,
        "seq_len": cfg.max_seq_len,
        "threads": cfg.num_threads,
        "steps": len(m),
        "tokens_per_s": tokens / secs if secs and len(m) > 1 else m[0]["tokens_per_s"],
        "s_per_step": statistics.median(r["s_per_step"] for r in steady),
        "tokens_per_step": (m[-1]["tokens_seen"] / len(m)) if m else 0,
        "final_loss": m[-1]["loss"] if m else None,
        "wall_s": wall,
    }


def base_cfg(args: argparse.Namespace, **kw: Any) -> TrainConfig:
    common: dict[str, Any] = dict(
        base_model=args.model,
        max_steps=args.steps,
        max_seq_len=args.seq_len,
        learning_rate=2e-4,
        lr_scheduler="constant",
        save_steps=10**9,
        logging_steps=1,
        device=args.device,
        num_threads=args.threads,
        bf16=args.bf16,
    )
    common.update(kw)
    return TrainConfig(**common)


def compare(args: argparse.Namespace, rows: pa.Table) -> list[dict[str, Any]]:
    original = base_cfg(args, method="full", batch_size=1, grad_accum=16, packing=False, learning_rate=2e-5)
    ours = base_cfg(
        args, method="lora", lora=LoraConfig(r=16, alpha=32), batch_size=4, grad_accum=4, packing=args.packing
    )
    return [
        measure("original (full, bs1 x ga16, no packing)", rows, original),
        measure("ours (LoRA r16, bs4 x ga4)", rows, ours),
    ]


def profile(args: argparse.Namespace, tokenizer: Any) -> list[dict[str, Any]]:
    grid = [
        # threads, seq_len, r, batch
        (1, 256, 16, 4),
        (2, 256, 16, 4),
        (2, 512, 16, 4),
        (2, 256, 8, 4),
        (2, 256, 16, 1),
        (2, 256, 16, 2),
        (2, 256, 16, 8),
        (2, 512, 8, 2),
    ]
    out = []
    for threads, seq_len, r, batch in grid:
        rows = synthetic_rows(tokenizer, max(16, batch * (args.steps + 1)), seq_len, seed=args.seed)
        cfg = base_cfg(
            args,
            method="lora",
            lora=LoraConfig(r=r, alpha=2 * r),
            batch_size=batch,
            grad_accum=1,
            max_seq_len=seq_len,
            num_threads=threads,
            packing=False,
        )
        res = measure(f"t{threads} L{seq_len} r{r} b{batch}", rows, cfg)
        out.append(res)
        console.print(f"  {res['name']}: {res['tokens_per_s']:.0f} tok/s, {res['s_per_step']:.2f} s/step")
    return out


def render(title: str, results: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for c in (
        "config",
        "method",
        "batch×accum",
        "packing",
        "seq",
        "threads",
        "tok/step",
        "s/step",
        "tok/s",
        "speedup",
    ):
        table.add_column(c, justify="left" if c in ("config", "method") else "right")
    ref = results[0]["tokens_per_s"] or 1.0
    for r in results:
        table.add_row(
            r["name"],
            r["method"] + (f" r{r['lora_r']}" if r["lora_r"] else ""),
            f"{r['batch']}×{r['grad_accum']}",
            "yes" if r["packing"] else "no",
            str(r["seq_len"]),
            str(r["threads"] or "-"),
            f"{r['tokens_per_step']:.0f}",
            f"{r['s_per_step']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['tokens_per_s'] / ref:.2f}×",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="alias, local dir or Hub id")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--packing", action="store_true", help="ours with packing (a step holds more rows)")
    ap.add_argument("--rows", type=Path, default=None, help="real SFT rows Parquet instead of synthetic")
    ap.add_argument("--profile", action="store_true", help="run the CPU settings grid instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("sft_benchmark.json"), help="write results here")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    args.model = resolve_base_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    env = {
        "model": args.model,
        "device": args.device or "auto",
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch

        env.update(
            torch=torch.__version__, cuda=torch.cuda.is_available(), torch_threads=torch.get_num_threads()
        )
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass

    if args.profile:
        results = profile(args, tokenizer)
        render(f"LoRA CPU profile, {args.steps} steps each, accumulation 1", results)
    else:
        rows = (
            pq.read_table(args.rows)
            if args.rows
            else synthetic_rows(tokenizer, 16 * args.steps, args.seq_len, args.seed)
        )
        results = compare(args, rows)
        render(f"SFT throughput, {args.steps} optimizer steps × 16 rows each", results)
    args.json.write_text(
        json.dumps(
            {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2
        )
    )
    console.print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
