"""The whole study on one GPU, projected from measured throughputs and the real token counts.

    python benchmarks/projection.py --data DIR --rates benchmarks/projection_rates.json \
        [--from-gpu-json benchmarks/results/gpu_vllm/throughput.json --from-gpu-json gpu_sft.json] \
        [--out benchmarks/results/projection.json]

The workload is the original study's: every training problem of MATH, GSM8K and SVAMP, 4 teacher
samples each, the filter, the rewrite (the `full` profile's: glyph rows for hard problems, half
as many natural rows for easy ones), 2 epochs of LoRA SFT, and the evaluation of base and tuned
on every held-out problem. Token counts come from the data (`benchmarks/study_rows.py`), counted
with `--tokenizer` (SmolLM2's by default; Qwen's own is not reachable offline, and both are
byte-level BPE tokenizers of similar English and LaTeX density):

* generated tokens per trace: the reference teacher's traces (built from the gold solutions),
  times `--teacher-length-factor` for a model teacher (1.0 assumed: Qwen2.5-7B's glyph traces
  have not been generated here), capped at the `full` profile's 1,024 new tokens;
* SFT rows: the reference teacher keeps all of its traces; a model teacher keeps
  `--keep-rate` of its 4 samples (1.0 by default, an upper bound) and its rows are as long;
* evaluation: base and tuned each answer every held-out problem with as many tokens as a trace.

Rates come from `--rates` (a JSON; `benchmarks/projection_rates.json` holds the H100 numbers
measured so far and says where each comes from); `--from-gpu-json` overrides them with what a
`benchmarks/gpu.py` result holds (the project's vllm backend at the largest workload; the SFT
`auto` row, else the fastest). Runs on a CPU in about a minute. Prints the table last and writes
the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAMPLES = 4  # teacher samples per training problem (the original study's)
EPOCHS = 2.0
MAX_NEW_TOKENS = 1024  # the full profile's generate and evaluate budget
ORIGINAL_HOURS = (4.0, 6.0)  # the original study's own statement, on one A100


def rates_from_gpu_json(path: Path) -> dict[str, Any]:
    """What a `benchmarks/gpu.py` result measured: generation and/or SFT rates."""
    data = json.loads(path.read_text())
    out: dict[str, Any] = {}
    gen = [r for r in data.get("generation", []) if r.get("way") == "ours (VLLMTeacher)"]
    if gen:
        best = max(gen, key=lambda r: int(r["workload"].split("x")[0]))
        out["generate_tokens_per_s"] = out["evaluate_tokens_per_s"] = best["tokens_per_s"]
        out["generate_source"] = f"{path}: project's vllm backend, {best['workload']}"
        if "vllm_engine_start_s" in data:
            out["engine_start_s"] = data["vllm_engine_start_s"]
    sft = [r for r in data.get("sft", []) if r.get("status") == "ok" and r.get("name") != "packing"]
    if sft:
        chosen = next((r for r in sft if r["name"] == "auto"), max(sft, key=lambda r: r["tokens_per_s"]))
        out["sft_tokens_per_s"] = chosen["tokens_per_s"]
        out["sft_source"] = f"{path}: SFT row {chosen['name']!r} ({data.get('sft_rows', {})})"
    return out


def workload(data_dir: str, tokenizer: Any, teacher_factor: float, keep_rate: float) -> dict[str, Any]:
    """Token counts of every stage, from the real data."""
    from benchmarks.study_rows import study_rows
    from glyph_core.prompts import glyph_messages

    t0 = time.perf_counter()
    study = study_rows(data_dir)
    filter_s = time.perf_counter() - t0  # unify + reference traces + filter + rewrite, on this CPU

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    traces = study.traces.to_pylist()
    trace_tokens = [
        min(MAX_NEW_TOKENS, round(n * teacher_factor)) for n in count([t["completion"] for t in traces])
    ]
    problems = study.problems.to_pylist()
    questions = {p["id"]: p["question"] for p in problems}
    prompts = [
        tokenizer.apply_chat_template(
            glyph_messages(questions[t["id"]]), tokenize=False, add_generation_prompt=True
        )
        for t in traces
    ]
    prompt_tokens = count(prompts)
    rows = study.sft.to_pylist()
    row_tokens = count([tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows])
    glyph_rows = sum(r["kind"] == "glyph" for r in rows)
    natural_rows = len(rows) - glyph_rows
    mean_row = statistics.mean(row_tokens)
    # a model teacher: 4 samples of every problem, `keep_rate` of them kept; natural rows follow
    # rewrite's ratio, capped by the easy problems there are
    easy = sum(p["split"] == "train" and p["bucket"] in ("easy", "medium") for p in problems)
    model_glyph_rows = round(glyph_rows * SAMPLES * keep_rate)
    model_natural_rows = min(easy, round(0.5 * model_glyph_rows))
    held_out = sum(p["split"] == "test" for p in problems)
    mean_trace = statistics.mean(trace_tokens)
    return {
        "train_problems": len(traces),
        "held_out_problems": held_out,
        "generate_requests": len(traces) * SAMPLES,
        "generate_prompt_tokens": sum(prompt_tokens) * SAMPLES,
        "generate_tokens": sum(trace_tokens) * SAMPLES,
        "mean_trace_tokens": mean_trace,
        "reference_sft_rows": {"glyph": glyph_rows, "natural": natural_rows},
        "sft_rows": model_glyph_rows + model_natural_rows,
        "mean_row_tokens": mean_row,
        "sft_tokens": (model_glyph_rows + model_natural_rows) * mean_row * EPOCHS,
        "evaluate_tokens": 2 * held_out * mean_trace,
        "cpu_stages_s_reference": filter_s,
    }


def project(w: dict[str, Any], rates: dict[str, Any]) -> list[dict[str, Any]]:
    engine = float(rates.get("engine_start_s", 0.0))
    train_start = float(rates.get("train_start_s", 0.0))
    return [
        {
            "stage": "generate (vLLM, 4 samples a problem)",
            "tokens": w["generate_tokens"],
            "rate": rates["generate_tokens_per_s"],
            "seconds": w["generate_tokens"] / rates["generate_tokens_per_s"] + engine,
        },
        {
            # math-verify on every trace: the reference run's CPU time, times the samples
            "stage": "unify + filter + rewrite (CPU)",
            "tokens": None,
            "rate": None,
            "seconds": w["cpu_stages_s_reference"] * SAMPLES,
        },
        {
            "stage": f"train (LoRA SFT, {EPOCHS:g} epochs)",
            "tokens": w["sft_tokens"],
            "rate": rates["sft_tokens_per_s"],
            "seconds": w["sft_tokens"] / rates["sft_tokens_per_s"] + train_start,
        },
        {
            "stage": "evaluate (base and tuned, vLLM)",
            "tokens": w["evaluate_tokens"],
            "rate": rates["evaluate_tokens_per_s"],
            "seconds": w["evaluate_tokens"] / rates["evaluate_tokens_per_s"] + engine,
        },
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("GLYPH_DATA_DIR"), help="data folder (GLYPH_DATA_DIR)")
    ap.add_argument("--rates", type=Path, default=Path(__file__).with_name("projection_rates.json"))
    ap.add_argument(
        "--from-gpu-json", type=Path, action="append", default=[], help="a benchmarks/gpu.py JSON"
    )
    ap.add_argument("--tokenizer", default="smollm2-135m", help="alias or directory of a chat tokenizer")
    ap.add_argument("--teacher-length-factor", type=float, default=1.0)
    ap.add_argument("--keep-rate", type=float, default=1.0, help="share of a model teacher's samples kept")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    if not args.data:
        ap.error("--data DIR or $GLYPH_DATA_DIR is required")

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from glyph_core.models import resolve_base_model

    rates: dict[str, Any] = json.loads(args.rates.read_text())
    for path in args.from_gpu_json:
        rates.update(rates_from_gpu_json(path))
    for key in ("generate_tokens_per_s", "evaluate_tokens_per_s", "sft_tokens_per_s"):
        if not isinstance(rates.get(key), int | float) or rates[key] <= 0:
            raise SystemExit(f"error: {args.rates}: {key} must be a positive number, got {rates.get(key)!r}")
    tok = AutoTokenizer.from_pretrained(resolve_base_model(args.tokenizer))
    w = workload(args.data, tok, args.teacher_length_factor, args.keep_rate)
    stages = project(w, rates)
    total_h = sum(s["seconds"] for s in stages) / 3600
    result = {
        "workload": w,
        "rates": rates,
        "stages": stages,
        "total_hours": total_h,
        "original_hours": ORIGINAL_HOURS,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    console = Console(width=140)
    console.print(
        f"{w['train_problems']:,} training problems x {SAMPLES} samples, {w['held_out_problems']:,} held out; "
        f"mean trace {w['mean_trace_tokens']:.0f} tokens, {w['sft_rows']:,} SFT rows of {w['mean_row_tokens']:.0f} "
        f"tokens; teacher length factor {args.teacher_length_factor}, keep rate {args.keep_rate}"
    )
    for key in ("generate_source", "sft_source", "evaluate_source"):
        if key in rates:
            console.print(f"{key}: {rates[key]}")
    t = Table(title="The whole study on one H100, projected (the original: 4–6 h on one A100)")
    for col in ("stage", "tokens", "tokens/s", "hours"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in stages:
        t.add_row(
            s["stage"],
            f"{s['tokens'] / 1e6:.1f} M" if s["tokens"] else "–",
            f"{s['rate']:,.0f}" if s["rate"] else "–",
            f"{s['seconds'] / 3600:.2f}",
        )
    t.add_row("total", "", "", f"{total_h:.2f}")
    console.print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
