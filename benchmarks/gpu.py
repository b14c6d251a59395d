"""GPU throughput of the pipeline's own generation and SFT code for a Qwen2.5-7B-shaped model.

One run on one GPU measures, side by side:
  * the hardware limits: device-to-device copy bandwidth (bounds decoding) and the bf16 matrix
    rate (bounds training);
  * generation: `glyph_core.teachers.hf.TransformersTeacher` (length-sorted batches, left padding)
    at several batch sizes, against the original scripts' way (plain `generate` on unsorted
    batches of 8 padded to the longest prompt);
  * LoRA SFT through `glyph_core.trainer.train_sft` (TRL + PEFT) with our configuration, against
    the original scripts' configuration (batch 1, gradient accumulation 16, no packing);
  * peak GPU memory of each.

The model has Qwen2.5-7B-Instruct's exact architecture (config below, from its config.json) and
random bf16 weights: throughput does not depend on the weights, and the Hub is unreachable.
EOS is disabled in generation so that every sequence runs to `--max-new-tokens`, as throughput
benchmarks do. Prompts are synthetic questions of 40 to 200 words, tokenized with the tokenizer
given by `--tokenizer` (any chat tokenizer; ids stay below Qwen's vocabulary size).

FLOPs: full fine-tuning costs 6·P·T (forward 2PT, backward 4PT). With LoRA the frozen weights
need no weight gradients, so the backward costs 2PT: we count 4·P·T (adapter terms are <1%).
Attention's sequence-quadratic FLOPs are left out of both, as in the usual MFU convention.

    python benchmarks/gpu.py --tokenizer DIR --out benchmarks/results/gpu_h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

QWEN25_7B = dict(
    architectures=["Qwen2ForCausalLM"],
    attention_dropout=0.0,
    bos_token_id=151643,
    eos_token_id=151645,
    hidden_act="silu",
    hidden_size=3584,
    initializer_range=0.02,
    intermediate_size=18944,
    max_position_embeddings=32768,
    max_window_layers=28,
    model_type="qwen2",
    num_attention_heads=28,
    num_hidden_layers=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-06,
    rope_theta=1000000.0,
    sliding_window=131072,
    tie_word_embeddings=False,
    use_cache=True,
    use_sliding_window=False,
    vocab_size=152064,
)

WORDS = [
    "apples",
    "train",
    "speed",
    "distance",
    "hours",
    "each",
    "total",
    "costs",
    "dollars",
    "twice",
    "half",
    "more",
    "less",
    "than",
    "number",
    "sum",
    "product",
    "ratio",
    "percent",
    "area",
    "triangle",
    "circle",
    "radius",
    "integer",
    "prime",
    "remainder",
    "marbles",
    "boxes",
    "students",
    "books",
    "pages",
    "minutes",
    "weekly",
    "price",
    "discount",
    "tickets",
]


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def measure_limits() -> dict[str, float]:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, best of several runs."""
    n = 2 * 1024**3 // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    t0 = sync_time()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    bw = 2 * a.numel() * 2 * reps / (sync_time() - t0)
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        x @ y
    t0 = sync_time()
    reps = 20
    for _ in range(reps):
        x @ y
    flops = 2 * m**3 * reps / (sync_time() - t0)
    del x, y
    torch.cuda.empty_cache()
    return {"copy_bandwidth_Bps": bw, "bf16_matmul_flops": flops}


def questions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 200))).capitalize() + "?"
        for _ in range(count)
    ]


def build_model() -> Any:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**QWEN25_7B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    return model


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_ours(model: Any, tok: Any, qs: list[str], batch: int, max_new: int) -> dict[str, Any]:
    from glyph_core.config import TeacherConfig
    from glyph_core.prompts import latent_messages
    from glyph_core.teachers.base import GenRequest
    from glyph_core.teachers.hf import TransformersTeacher

    cfg = TeacherConfig(
        backend="transformers",
        model="random-qwen2.5-7b",
        temperature=0.0,
        max_new_tokens=max_new,
        batch_size=batch,
        device="cuda",
    )
    teacher = TransformersTeacher(cfg, model=model, tokenizer=tok)
    teacher.eos_ids = {QWEN25_7B["vocab_size"] - 1}  # effectively never: run to max_new_tokens
    reqs = [GenRequest(id=f"q{i}", messages=latent_messages(q)) for i, q in enumerate(qs)]
    teacher.generate(reqs[:batch], 1)  # warm-up: kernels, allocator
    torch.cuda.reset_peak_memory_stats()
    t0 = sync_time()
    out = teacher.generate(reqs, 1)
    secs = sync_time() - t0
    tokens = sum(c[0].completion_tokens for c in out)
    return {
        "tokens": tokens,
        "seconds": secs,
        "tokens_per_s": tokens / secs,
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30,
    }


def bench_original(model: Any, tok: Any, qs: list[str], max_new: int, batch: int = 8) -> dict[str, Any]:
    """The original scripts: unsorted batches of 8, padded to the longest prompt, plain generate."""
    from glyph_core.prompts import latent_messages

    texts = [
        tok.apply_chat_template(latent_messages(q), tokenize=False, add_generation_prompt=True) for q in qs
    ]
    tok.padding_side = "left"
    eos = QWEN25_7B["vocab_size"] - 1

    def run(chunk: list[str]) -> int:
        enc = tok(chunk, return_tensors="pt", padding=True).to("cuda")
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
        return int((out.shape[1] - enc["input_ids"].shape[1]) * len(chunk))

    run(texts[:batch])
    torch.cuda.reset_peak_memory_stats()
    t0 = sync_time()
    tokens = sum(run(texts[i : i + batch]) for i in range(0, len(texts), batch))
    secs = sync_time() - t0
    return {
        "tokens": tokens,
        "seconds": secs,
        "tokens_per_s": tokens / secs,
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30,
    }


def decode_bound(params: int, batch: int, ctx: int, bw: float) -> float:
    """Tokens/s if every decode step only had to read the weights and the KV cache once."""
    weight_bytes = 2 * params
    kv_per_token = (
        2
        * QWEN25_7B["num_hidden_layers"]
        * QWEN25_7B["num_key_value_heads"]
        * (QWEN25_7B["hidden_size"] // QWEN25_7B["num_attention_heads"])
        * 2
    )
    step_bytes = weight_bytes + batch * ctx * kv_per_token
    return batch * bw / step_bytes


def sft_rows(count: int, seed: int = 1) -> pa.Table:
    rng = random.Random(seed)
    rows = []
    for i, q in enumerate(questions(count, seed)):
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 300)))
        rows.append(
            {
                "id": f"s{i}",
                "kind": "glyph",
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}],
            }
        )
    return pa.Table.from_pylist(rows)


def bench_sft(model_dir: str, label: str, steps: int, **overrides: Any) -> dict[str, Any]:
    from glyph_core.config import TrainConfig
    from glyph_core.trainer import train_sft

    cfg = TrainConfig(
        base_model=model_dir,
        max_steps=steps,
        logging_steps=1,
        save_steps=10_000,
        bf16="on",
        max_seq_len=1024,
        **overrides,
    )
    rows = sft_rows(cfg.batch_size * cfg.grad_accum * steps + 8)
    work = Path(tempfile.mkdtemp(prefix=f"sft-{label}-"))
    torch.cuda.reset_peak_memory_stats()
    try:
        result = train_sft(rows, cfg, work, keep_model=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timed = result.metrics.to_pylist()[1:]  # the first optimizer step includes warm-up
    tokens = sum(r["tokens_per_s"] * r["interval_s"] for r in timed)
    secs = sum(r["interval_s"] for r in timed)
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "label": label,
        "steps_timed": len(timed),
        "tokens": tokens,
        "seconds": secs,
        "tokens_per_s": tokens / secs,
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30,
        "config": {k: v for k, v in overrides.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a local chat tokenizer directory")
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--sft-steps", type=int, default=4)
    ap.add_argument("--skip", nargs="*", default=[], choices=["generate", "sft"])
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    console = Console()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "args": vars(args),
    }
    limits = measure_limits()
    result["limits"] = limits
    console.print(
        f"[bold]{result['device']}[/]: copy {limits['copy_bandwidth_Bps'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {limits['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s"
    )

    model = build_model()
    params = n_params(model)
    result["params"] = params
    qs = questions(args.prompts)
    avg_prompt = sum(
        len(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)) for q in qs
    ) / len(qs)

    table = Table(title=f"Generation, Qwen2.5-7B architecture ({params / 1e9:.2f}B params, bf16)")
    for col in ("way", "batch", "tokens/s", "× original", "% of bandwidth bound", "peak GiB"):
        table.add_column(col, justify="right")
    if "generate" not in args.skip:
        orig = bench_original(model, tok, qs, args.max_new_tokens)
        gen_rows = [{"way": "original (unsorted, padded)", "batch": 8, **orig}]
        for b in args.batch_sizes:
            gen_rows.append(
                {
                    "way": "ours (TransformersTeacher)",
                    "batch": b,
                    **bench_ours(model, tok, qs, b, args.max_new_tokens),
                }
            )
        for r in gen_rows:
            bound = decode_bound(
                params, r["batch"], int(avg_prompt + args.max_new_tokens / 2), limits["copy_bandwidth_Bps"]
            )  # bytes read + written per second
            r["ratio_to_original"] = r["tokens_per_s"] / orig["tokens_per_s"]
            r["bandwidth_bound_tokens_per_s"] = bound
            r["fraction_of_bound"] = r["tokens_per_s"] / bound
            table.add_row(
                r["way"],
                str(r["batch"]),
                f"{r['tokens_per_s']:.0f}",
                f"{r['ratio_to_original']:.2f}",
                f"{100 * r['fraction_of_bound']:.0f}%",
                f"{r['peak_mem_GiB']:.1f}",
            )
        result["generation"] = gen_rows
        console.print(table)

    if "sft" not in args.skip:
        model_dir = Path(tempfile.mkdtemp(prefix="qwen7b-random-"))
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        configs = [
            ("original (batch 1, accum 16, no packing)", dict(batch_size=1, grad_accum=16)),
            ("ours (batch 8, accum 2)", dict(batch_size=8, grad_accum=2)),
            (
                "ours (batch 8, accum 2, packing, grad. ckpt)",
                dict(batch_size=8, grad_accum=2, packing=True, gradient_checkpointing=True),
            ),
        ]
        runs = []
        for label, overrides in configs:
            try:
                runs.append(bench_sft(str(model_dir), label, args.sft_steps, **overrides))
            except torch.OutOfMemoryError:
                console.print(f"[red]{label}: out of memory[/]")
                gc.collect()
                torch.cuda.empty_cache()
        peak = limits["bf16_matmul_flops"]
        st = Table(title="LoRA SFT (r=16, all linear layers), seq ≤ 1024")
        for col in ("config", "tokens/s", "× original", "MFU (4PT)", "MFU (6PT conv.)", "peak GiB"):
            st.add_column(col, justify="right")
        for r in runs:
            r["ratio_to_original"] = r["tokens_per_s"] / runs[0]["tokens_per_s"]
            r["mfu_lora_4PT"] = 4 * params * r["tokens_per_s"] / peak
            r["mfu_6PT"] = 6 * params * r["tokens_per_s"] / peak
            st.add_row(
                r["label"],
                f"{r['tokens_per_s']:.0f}",
                f"{r['ratio_to_original']:.2f}",
                f"{100 * r['mfu_lora_4PT']:.1f}%",
                f"{100 * r['mfu_6PT']:.1f}%",
                f"{r['peak_mem_GiB']:.1f}",
            )
        result["sft"] = runs
        console.print(st)
        shutil.rmtree(model_dir, ignore_errors=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
