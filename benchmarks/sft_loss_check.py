"""Same loss, faster: the current and the fast SFT configuration trained on the same real rows.

    PYTHONUNBUFFERED=1 python benchmarks/sft_loss_check.py --data DIR --out benchmarks/results/sft_loss_check

SmolLM2-135M-Instruct, LoRA (the `full` profile's r 16, alpha 32, dropout 0.05, all linear
layers), 16 rows a step, the study's real SFT rows (`benchmarks/study_rows.py`: every training
problem, the reference teacher's traces, the `full` profile's rewrite), `--steps` optimizer steps.
Three runs on the same GPU:

* `current`: main before this change (batch 4 x accumulation 4, padded batches, sdpa, no
  Liger, no checkpointing), seed 0;
* `fast`: every speed setting `auto` (the new GPU default: padding-free micro-batches, Liger,
  the micro-batch and checkpointing `resolve_speed` picks), seed 0: the same rows in every step;
* `current, seed 1`: the noise to judge the difference by (another row order and LoRA init).

The rows of each step, and so the completion tokens the loss is taken over, are the same in
`current` and `fast`: the tokens seen per step must agree exactly, and their per-step losses may
differ only by floating-point rounding and LoRA dropout's random masks (their draws depend on the
micro-batch shapes), which is far less than what another seed changes. Writes `loss_check.json`
(both curves, the tokens, the speeds), `loss_check.md` (the table) and `loss_check.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_sft import TODAY  # noqa: E402 -- after the path set-up above

CURRENT: dict[str, Any] = TODAY  # the settings before fast SFT: padded, micro-batch 4, no Liger
FAST: dict[str, Any] = dict(batch_size=4, grad_accum=4)  # every speed setting at its default: auto


def train(rows: Any, args: argparse.Namespace, seed: int, speed: dict[str, Any]) -> dict[str, Any]:
    from glyph_core.config import TrainConfig
    from glyph_core.trainer import train_sft

    cfg = TrainConfig(
        base_model=args.model,
        max_steps=args.steps,
        max_seq_len=args.seq_len,
        learning_rate=args.lr,
        seed=seed,
        logging_steps=1,
        save_steps=10**6,
        **speed,
    )
    with tempfile.TemporaryDirectory(prefix="loss-check-") as tmp:
        t0 = time.perf_counter()
        result = train_sft(rows, cfg, tmp, keep_model=False)
        wall = time.perf_counter() - t0
    m = result.metrics.to_pylist()
    secs = sum(r["interval_s"] for r in m[1:])
    return {
        "seed": seed,
        "speed": None if result.speed is None else result.speed.__dict__,
        "steps": [r["step"] for r in m],
        "loss": [r["loss"] for r in m],
        "tokens_seen": [r["tokens_seen"] for r in m],
        "tokens_per_s": (m[-1]["tokens_seen"] - m[0]["tokens_seen"]) / secs if secs else None,
        "wall_s": wall,
    }


def compare(a: list[float], b: list[float]) -> dict[str, float]:
    d = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return {"mean_abs_diff": statistics.mean(d), "max_abs_diff": max(d)}


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in runs.items():
        ax.plot(r["steps"], r["loss"], label=name, linewidth=1.0, alpha=0.8)
    ax.set_xlabel("optimizer step (16 rows)")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title("SmolLM2-135M LoRA on the study's SFT rows: current vs fast configuration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("GLYPH_DATA_DIR"), help="data folder (GLYPH_DATA_DIR)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sft_loss_check"))
    args = ap.parse_args(argv)
    if not args.data:
        ap.error("--data DIR or $GLYPH_DATA_DIR is required")

    from benchmarks.study_rows import study_rows
    from glyph_core.models import resolve_base_model

    args.model = resolve_base_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    study = study_rows(args.data)
    print(f"{study.sft.num_rows} SFT rows from {args.data} in {time.perf_counter() - t0:.0f} s", flush=True)

    runs: dict[str, dict[str, Any]] = {}
    for name, seed, speed in (("current", 0, CURRENT), ("fast", 0, FAST), ("current, seed 1", 1, CURRENT)):
        runs[name] = train(study.sft, args, seed, speed)
        r = runs[name]
        print(
            f"{name}: {r['tokens_per_s']:.0f} tok/s, last loss {r['loss'][-1]:.4f}, {r['speed']}", flush=True
        )

    cur, fast, noise = runs["current"], runs["fast"], runs["current, seed 1"]
    tail = max(1, len(cur["loss"]) // 6)
    summary = {
        "same_tokens_every_step": cur["tokens_seen"] == fast["tokens_seen"],
        "fast_vs_current": compare(fast["loss"], cur["loss"]),
        "seed1_vs_current": compare(noise["loss"], cur["loss"]),
        "last_steps": tail,
        "mean_loss_last_steps": {n: statistics.mean(r["loss"][-tail:]) for n, r in runs.items()},
        "speedup": fast["tokens_per_s"] / cur["tokens_per_s"],
    }
    summary["within_noise"] = (
        summary["same_tokens_every_step"]
        and summary["fast_vs_current"]["mean_abs_diff"] < summary["seed1_vs_current"]["mean_abs_diff"]
    )
    (args.out / "loss_check.json").write_text(
        json.dumps(
            {
                "rows": study.sft.num_rows,
                "args": {k: str(v) for k, v in vars(args).items()},
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
    )
    plot(runs, args.out / "loss_check.png")
    lines = [
        f"| run | tokens/s | mean loss, last {tail} steps | mean abs. step-loss diff. to current | max |",
        "|---|---:|---:|---:|---:|",
        f"| current | {cur['tokens_per_s']:.0f} | {summary['mean_loss_last_steps']['current']:.4f} | – | – |",
    ]
    for name, key in (("fast", "fast_vs_current"), ("current, seed 1", "seed1_vs_current")):
        d = summary[key]
        lines.append(
            f"| {name} | {runs[name]['tokens_per_s']:.0f} | {summary['mean_loss_last_steps'][name]:.4f} "
            f"| {d['mean_abs_diff']:.4f} | {d['max_abs_diff']:.4f} |"
        )
    lines.append("")
    lines.append(
        f"Same tokens in every step: {summary['same_tokens_every_step']}; within noise: {summary['within_noise']}; "
        f"speed-up {summary['speedup']:.2f}x."
    )
    (args.out / "loss_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if summary["within_noise"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
