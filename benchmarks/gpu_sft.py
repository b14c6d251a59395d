"""The SFT section of `benchmarks/gpu.py`: LoRA SFT on the Qwen2.5-7B shape, one switch at a time.

Every configuration trains through `glyph_core.trainer.train_sft` (TRL + PEFT, LoRA r 16 on all
linear layers, bf16, 16 rows per optimizer step) on the same rows in the same order, each in its
own process: an out-of-memory run (or a crash) is recorded and the next one starts on a clean
card, and Liger's patches of the transformers modules (process-wide) stay in the run that asked
for them. The first `--sft-warmup` optimizer steps (kernel selection, Triton and torch.compile
compilation) are left out of the rates.

Rates: non-padding tokens per second; MFU = 4·P·T (LoRA: no weight gradients for the frozen
weights) and 6·P·T (the full fine-tuning convention) over the bf16 matmul rate measured in the
same run, P the model's parameters, attention's quadratic FLOPs left out (the usual convention).

Rows (`--sft-rows`): `real` = the study's SFT rows built from `--data` (the reference teacher's
traces, `benchmarks/study_rows.py`; truncated at 2,048 tokens), `uniform` = synthetic rows of
`--sft-seq-len` tokens each (the issue's bare-loop setting at 1,024).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_STEP = 16  # the full profile's batch_size 4 x grad_accum 4, and the original's 1 x 16

# The switches, each added to the one before (`auto` is the new GPU default; `packing` changes
# what a step holds, so it is shown for its speed only). Every field not set here is explicit in
# `_FIXED`, so that a row measures exactly the switches it names.
TODAY = dict(
    batch_size=4,
    grad_accum=4,
    micro_batch_size=None,
    padding_free=False,
    gradient_checkpointing=False,
    liger_kernel=False,
    attn_implementation="sdpa",
    torch_compile=False,
)
_PF = {**TODAY, "padding_free": True}
_LIGER = {**_PF, "liger_kernel": True}
_MICRO = {**_LIGER, "micro_batch_size": "auto"}  # the largest that fits without checkpointing
SFT_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "original": (
        "original scripts: batch 1, accumulation 16, padded",
        {**TODAY, "batch_size": 1, "grad_accum": 16},
    ),
    "today": ("main before: batch 4, accumulation 4, padded", TODAY),
    "padding_free": ("+ padding-free (position ids, sdpa block mask)", _PF),
    "liger": ("+ Liger RMSNorm/RoPE/SwiGLU", _LIGER),
    "micro": ("+ largest micro-batch without checkpointing", _MICRO),
    "checkpointing": (
        "+ checkpointing, the whole step in one pass",
        {**_LIGER, "micro_batch_size": 16, "gradient_checkpointing": True},
    ),
    "flex": ("micro + flex attention", {**_MICRO, "attn_implementation": "flex_attention"}),
    "flex_checkpointing": (
        "checkpointing + flex attention",
        {
            **_LIGER,
            "micro_batch_size": 16,
            "gradient_checkpointing": True,
            "attn_implementation": "flex_attention",
        },
    ),
    "compile": ("micro + torch.compile", {**_MICRO, "torch_compile": True}),
    "auto": (
        "auto (the new GPU default)",
        dict(
            batch_size=4,
            grad_accum=4,
            micro_batch_size="auto",
            padding_free="auto",
            gradient_checkpointing="auto",
            liger_kernel="auto",
            attn_implementation="auto",
            torch_compile=False,
        ),
    ),
    "packing": ("auto + packing (bfd; a step holds more rows)", {"packing": True}),
}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sft-configs", nargs="+", default=list(SFT_CONFIGS), choices=list(SFT_CONFIGS))
    ap.add_argument("--sft-rows", choices=["real", "uniform"], default="real")
    ap.add_argument("--data", default=None, help="data folder for --sft-rows real (else $GLYPH_DATA_DIR)")
    ap.add_argument("--sft-seq-len", type=int, default=2048, help="max_seq_len; uniform rows' length")
    ap.add_argument("--sft-steps", type=int, default=6, help="timed optimizer steps per configuration")
    ap.add_argument("--sft-warmup", type=int, default=2, help="optimizer steps left out of the rates")
    ap.add_argument("--sft-timeout", type=int, default=300, help="seconds per configuration")
    ap.add_argument(
        "--sft-model-dir", default=".gpu/qwen7b-random", help="built once, reused while it exists"
    )
    ap.add_argument("--sft-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sft-device", default="cuda", help=argparse.SUPPRESS)  # cpu: the tests' smoke run


# ---------------------------------------------------------------------------------------------
# rows


def uniform_rows(tok: Any, count: int, tokens: int, seed: int = 1) -> pa.Table:
    """Chat rows of about `tokens` tokens each (chat template included): a question, and an
    answer of random words grown until the row is long enough."""
    from benchmarks.gpu import WORDS, questions

    rng = random.Random(seed)
    rows = []
    for i, question in enumerate(questions(count, seed)):
        q = " ".join(question.split()[: max(4, tokens // 8)])  # the answer makes up most of the row
        words: list[str] = []
        while True:
            words += [rng.choice(WORDS) for _ in range(32)]
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": " ".join(words)}]
            text = tok.apply_chat_template(msgs, tokenize=False)
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            if n >= tokens:
                ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
                msgs[1]["content"] = tok.decode(ids[: max(1, len(ids) - (n - tokens))])
                break
        rows.append({"id": f"u{i}", "kind": "glyph", "messages": msgs})
    return pa.Table.from_pylist(rows)


def real_rows(data_dir: str, count: int) -> pa.Table:
    from benchmarks.study_rows import study_rows

    sft = study_rows(data_dir).sft  # shuffled by rewrite's seed: a fair sample of the study
    if sft.num_rows < count:
        raise SystemExit(f"error: {data_dir} gives {sft.num_rows} SFT rows, fewer than {count} needed")
    return sft.slice(0, count)


# ---------------------------------------------------------------------------------------------
# one configuration, in its own process


def worker(spec_path: str) -> None:
    """Train one configuration and write its measurement (or its OOM) to the spec's `out`."""
    import torch

    from glyph_core.config import TrainConfig
    from glyph_core.trainer import Host, activation_bytes_per_token, train_sft

    spec = json.loads(Path(spec_path).read_text())
    rows = pq.read_table(spec["rows"])
    steps = spec["warmup"] + spec["steps"]
    cfg = TrainConfig(
        base_model=spec["model_dir"],
        max_steps=steps,
        logging_steps=1,
        save_steps=10**6,
        bf16="on" if spec["device"] == "cuda" else "off",
        device=spec["device"],
        max_seq_len=spec["seq_len"],
        learning_rate=2e-4,
        lr_scheduler="constant",
        **spec["overrides"],
    )
    out: dict[str, Any] = {"name": spec["name"], "config": spec["overrides"]}
    work = Path(tempfile.mkdtemp(prefix=f"sft-{spec['name']}-"))
    t0 = time.perf_counter()
    try:
        result = train_sft(rows, cfg, work, keep_model=False)
    except torch.OutOfMemoryError as exc:
        out.update(status="oom", error=str(exc).splitlines()[0], peak_mem_GiB=_peak(torch, "allocated"))
        Path(spec["out"]).write_text(json.dumps(out, indent=2))
        return
    m = result.metrics.to_pylist()
    w = spec["warmup"]
    timed = m[w:]
    tokens = m[-1]["tokens_seen"] - (m[w - 1]["tokens_seen"] if w > 0 else 0.0)
    secs = sum(r["interval_s"] for r in timed)
    speed = result.speed
    assert speed is not None
    host = Host(
        cuda=True,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_layers=spec["num_layers"],
    )
    est = activation_bytes_per_token(
        host, liger=speed.liger_kernel, dropout=cfg.lora.dropout, checkpointing=speed.gradient_checkpointing
    )
    out.update(
        status="ok",
        steps_timed=len(timed),
        tokens=tokens,
        seconds=secs,
        tokens_per_s=tokens / secs,
        tokens_per_step=tokens / len(timed),
        losses=[r["loss"] for r in m],
        peak_mem_GiB=_peak(torch, "allocated"),
        peak_reserved_GiB=_peak(torch, "reserved"),
        est_activation_MiB_per_token=est / 2**20,
        speed=dataclasses.asdict(speed),
        wall_s=time.perf_counter() - t0,
    )
    Path(spec["out"]).write_text(json.dumps(out, indent=2))


def _peak(torch: Any, kind: str) -> float:
    if not torch.cuda.is_available():
        return 0.0
    fn = torch.cuda.max_memory_allocated if kind == "allocated" else torch.cuda.max_memory_reserved
    return float(fn()) / 2**30


def _run_one(name: str, spec: dict[str, Any], timeout: int, tmp: Path) -> dict[str, Any]:
    spec = {**spec, "name": name, "overrides": SFT_CONFIGS[name][1], "out": str(tmp / f"{name}.json")}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("gpu.py")), "--sft-worker", str(spec_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "timeout", "wall_s": time.perf_counter() - t0}
    (tmp / f"{name}.log").write_text(proc.stdout + proc.stderr)
    out_path = Path(spec["out"])
    if out_path.exists():
        return json.loads(out_path.read_text())
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
    status = (
        "oom" if any("OutOfMemoryError" in line or "out of memory" in line for line in tail) else "failed"
    )
    return {"name": name, "status": status, "rc": proc.returncode, "error": "\n".join(tail)}


# ---------------------------------------------------------------------------------------------
# the section


def model_dir(tok: Any, path: str) -> Path:
    """The 7B-shaped model with random bf16 weights, saved once (15 GB) and reused while it exists
    (`.gpu/` is git-ignored, so it survives between calls on a warm device machine)."""
    import torch

    from benchmarks.gpu import build_model

    out = Path(path)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    model = build_model()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    tmp.rename(out)
    return out


def run(
    args: argparse.Namespace, tok: Any, params: int, limits: dict[str, float], out_dir: Path
) -> list[dict[str, Any]]:
    """Every configuration of `--sft-configs`, in order; returns their measurements."""
    from benchmarks.gpu import QWEN25_7B

    t0 = time.perf_counter()
    mdir = model_dir(tok, args.sft_model_dir)
    print(f"model dir {mdir} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    count = ROWS_PER_STEP * (args.sft_warmup + args.sft_steps)
    if args.sft_rows == "real":
        import os

        data = args.data or os.environ.get("GLYPH_DATA_DIR")
        if not data:
            raise SystemExit("error: --sft-rows real needs --data DIR or $GLYPH_DATA_DIR")
        rows = real_rows(data, count)
    else:
        rows = uniform_rows(tok, count, args.sft_seq_len)
    tmp = out_dir / "sft_runs"
    tmp.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows, tmp / "rows.parquet")
    spec = {
        "model_dir": str(mdir.resolve()),
        "rows": str((tmp / "rows.parquet").resolve()),
        "seq_len": args.sft_seq_len,
        "steps": args.sft_steps,
        "warmup": args.sft_warmup,
        "device": args.sft_device,
        "hidden_size": QWEN25_7B["hidden_size"],
        "intermediate_size": QWEN25_7B["intermediate_size"],
        "num_layers": QWEN25_7B["num_hidden_layers"],
    }
    runs = []
    for name in args.sft_configs:
        r = _run_one(name, spec, args.sft_timeout, tmp)
        r["label"] = SFT_CONFIGS[name][0]
        if r.get("status") == "ok":
            r["mfu_lora_4PT"] = 4 * params * r["tokens_per_s"] / limits["bf16_matmul_flops"]
            r["mfu_6PT"] = 6 * params * r["tokens_per_s"] / limits["bf16_matmul_flops"]
            print(
                f"{name}: {r['tokens_per_s']:.0f} tok/s, MFU {100 * r['mfu_lora_4PT']:.1f} %, "
                f"peak {r['peak_mem_GiB']:.1f} GiB, {r['speed']}",
                flush=True,
            )
        else:
            print(f"{name}: {r.get('status')} {r.get('error', '')[-300:]}", flush=True)
        runs.append(r)
    base = next((r for r in runs if r["name"] == "original" and r.get("status") == "ok"), None)
    today = next((r for r in runs if r["name"] == "today" and r.get("status") == "ok"), None)
    for r in runs:
        if r.get("status") != "ok":
            continue
        if base:
            r["ratio_to_original"] = r["tokens_per_s"] / base["tokens_per_s"]
        if today and r["name"] != "packing":
            # the same rows in every step: the losses differ by rounding only (a switch that let
            # rows attend to each other, or counted other tokens, would show here)
            diffs = [abs(a - b) for a, b in zip(r["losses"], today["losses"], strict=False)]
            r["max_loss_diff_to_today"] = max(diffs)
    return runs


def table(runs: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    cols = (
        "config",
        "micro×accum",
        "ckpt",
        "attn",
        "tok/s",
        "× orig.",
        "MFU 4PT",
        "MFU 6PT",
        "peak GiB",
        "Δloss",
    )
    t = Table(title=title)
    for col in cols:
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in runs:
        if r.get("status") != "ok":
            cells = [""] * len(cols)
            cells[0], cells[4] = r["label"], r.get("status", "?").upper()
            cells[8] = f"{r.get('peak_mem_GiB', 0):.1f}"
            t.add_row(*cells)
            continue
        s = r["speed"]
        t.add_row(
            r["label"],
            f"{s['micro_batch_size']}×{s['grad_accum']}",
            "yes" if s["gradient_checkpointing"] else "no",
            str(s["attn_implementation"]),
            f"{r['tokens_per_s']:.0f}",
            f"{r['ratio_to_original']:.2f}" if "ratio_to_original" in r else "–",
            f"{100 * r['mfu_lora_4PT']:.1f}%",
            f"{100 * r['mfu_6PT']:.1f}%",
            f"{r['peak_mem_GiB']:.1f}",
            f"{r['max_loss_diff_to_today']:.1e}" if "max_loss_diff_to_today" in r else "–",
        )
    return t
