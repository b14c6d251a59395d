"""Teacher generation throughput: our transformers backend at batch 1/8/32 against the original
scripts' way (plain `model.generate` at batch 8, unsorted, `tokenizer(padding=True)` with the
tokenizer's default padding side), side by side on the same problems and prompts.

    python benchmarks/generate.py                       # CPU, SmolLM2-135M, 32 problems
    python benchmarks/generate.py --device cuda --model Qwen/Qwen2.5-7B-Instruct --problems 256 \
        --batch-sizes 1 8 32 128 --backend transformers vllm

Tokens are counted the same way for every mode: completion tokens up to and including the first
eos, per sequence. Greedy decoding, so every mode does the same work per problem (except where
the original's right padding changes the output, which the stop/length columns show).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from glyph_core.config import TeacherConfig  # noqa: E402
from glyph_core.prompts import messages_for  # noqa: E402
from glyph_core.teachers.base import GenRequest  # noqa: E402

DATA = Path("/work/shared/data")


def load_questions(n: int, data_dir: Path) -> list[str]:
    """GSM8K and MATH train questions, interleaved (varied prompt lengths, like a real shard)."""
    gsm = [json.loads(line)["question"] for line in (data_dir / "gsm8k" / "train.jsonl").open()][:n]
    math = [json.loads(line)["problem"] for line in (data_dir / "math" / "train.jsonl").open()][:n]
    mixed = [q for pair in zip(gsm, math, strict=False) for q in pair]
    return mixed[:n]


def run_ours(cfg: TeacherConfig, requests: list[GenRequest], teacher: Any | None = None) -> dict[str, Any]:
    from glyph_core.teachers import make_teacher

    teacher = teacher or make_teacher(cfg)
    t0 = time.perf_counter()
    out = teacher.generate(requests, n=1)
    wall = time.perf_counter() - t0
    comps = [c[0] for c in out]
    return {
        "wall_s": wall,
        "completion_tokens": sum(c.completion_tokens for c in comps),
        "stop": sum(c.finish_reason == "stop" for c in comps),
        "length": sum(c.finish_reason == "length" for c in comps),
        "error": sum(c.finish_reason == "error" for c in comps),
    }


def run_original(
    model: Any, tokenizer: Any, requests: list[GenRequest], batch: int, max_new: int
) -> dict[str, Any]:
    """The original scripts: unsorted batches, default padding side, decode everything."""
    import torch

    eos = tokenizer.eos_token_id
    texts = [
        tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
        for r in requests
    ]
    tokens = stop = length = 0
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            seqs = model.generate(
                **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        for row in seqs[:, enc["input_ids"].shape[1] :].tolist():
            cut = next((j for j, t in enumerate(row) if t == eos), None)
            tokens += len(row) if cut is None else cut + 1
            stop += cut is not None
            length += cut is None
    return {
        "wall_s": time.perf_counter() - t0,
        "completion_tokens": tokens,
        "stop": stop,
        "length": length,
        "error": 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backend", nargs="+", default=["transformers"], choices=["transformers", "vllm"])
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--original-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/generate.json"))
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from glyph_core.teachers.hf import TransformersTeacher, load_model_and_tokenizer, pick_device

    device = pick_device(args.device)
    console = Console()
    questions = load_questions(args.problems, args.data_dir)
    requests = [GenRequest(f"b{i}", messages_for("glyph", q)) for i, q in enumerate(questions)]
    base = TeacherConfig(backend="transformers", model=args.model, temperature=0.0,
                         max_new_tokens=args.max_new_tokens, device=device)  # fmt: skip
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()

    if "transformers" in args.backend:
        model, tokenizer = load_model_and_tokenizer(base, device)
        # warm-up (allocator, kernels), not timed
        TransformersTeacher(base.model_copy(update={"max_new_tokens": 4}), model, tokenizer).generate(
            requests[:2]
        )
        # the original: its own tokenizer state (default padding side), same weights
        from transformers import AutoTokenizer

        from glyph_core.models import resolve_model

        orig_tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
        if orig_tok.pad_token is None:
            orig_tok.pad_token = orig_tok.eos_token
        r = run_original(model, orig_tok, requests, args.original_batch, args.max_new_tokens)
        rows.append(
            {"mode": f"original (unsorted, {orig_tok.padding_side} pad)", "batch": args.original_batch, **r}
        )
        for bs in args.batch_sizes:
            cfg = base.model_copy(update={"batch_size": bs})
            r = run_ours(cfg, requests, TransformersTeacher(cfg, model, tokenizer))
            rows.append({"mode": "transformers backend (sorted, left pad)", "batch": bs, **r})
        del model
    if "vllm" in args.backend:
        cfg = base.model_copy(update={"backend": "vllm"})
        rows.append({"mode": "vllm backend", "batch": len(requests), **run_ours(cfg, requests)})

    for r in rows:
        r["tokens_per_s"] = r["completion_tokens"] / r["wall_s"] if r["wall_s"] else 0.0
        r["problems_per_s"] = len(requests) / r["wall_s"] if r["wall_s"] else 0.0
    table = Table(title=f"generate: {args.model} on {device}, {len(requests)} problems, "
                        f"max_new_tokens={args.max_new_tokens}, greedy")  # fmt: skip
    for col in ("mode", "batch", "tokens", "wall s", "tok/s", "problems/s", "stop", "length"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        table.add_row(r["mode"], str(r["batch"]), str(r["completion_tokens"]), f"{r['wall_s']:.1f}",
                      f"{r['tokens_per_s']:.1f}", f"{r['problems_per_s']:.3f}", str(r["stop"]), str(r["length"]))  # fmt: skip
    console.print(table)
    meta = {
        "model": args.model, "device": device, "problems": len(requests), "max_new_tokens": args.max_new_tokens,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    console.print(
        f"wrote {args.json}  (load average before/after: {load_before[0]:.1f}/{meta['loadavg_after'][0]:.1f})"
    )


if __name__ == "__main__":
    main()
