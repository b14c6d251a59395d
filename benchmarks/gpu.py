"""GPU throughput of the pipeline's own generation and SFT code for a Qwen2.5-7B-shaped model.

One run on one GPU measures, side by side:
  * the hardware limits: device-to-device copy bandwidth (bounds decoding) and the bf16 matrix
    rate (bounds training);
  * generation, for each workload (prompts × new tokens; default 128×128 and 1024×256), on the
    same prompts: the original scripts' way (plain `generate` on unsorted batches of 8 padded to
    the longest prompt), `glyph_core.teachers.hf.TransformersTeacher` (length-sorted batches,
    left padding), plain vLLM (`LLM.generate` on the chat-template texts), and the project's vllm
    backend (`VLLMTeacher.generate` on the requests: chat template, tokenization, seeds, decoding
    included) in the same engine as plain vLLM; tokens/s, the ratio to the original, and the
    fraction of the compute bound (2·P FLOPs a token) and of the bandwidth bound (every decode
    step reads the weights and the KV cache once);
  * LoRA SFT through `glyph_core.trainer.train_sft` (TRL + PEFT): the original scripts'
    configuration (batch 1, gradient accumulation 16, padded), main's before issue 18, and each
    speed switch added on its own, every configuration in its own process
    (`benchmarks/gpu_sft.py`, which documents the rows and the MFU convention);
  * peak GPU memory of each.

The model has Qwen2.5-7B-Instruct's exact architecture (config below, from its config.json) and
random bf16 weights (vLLM: `load_format="dummy"` on a local directory holding that config and the
`--tokenizer`'s files, vocabulary padded to Qwen's size): throughput does not depend on the
weights, and the Hub is unreachable. The transformers ways disable EOS so that every sequence
runs to the token budget; vLLM's are counted by the tokens they actually produced (a random
model almost never emits an eos). Prompts are synthetic questions of 40 to 200 words. The slow
ways run on the first `--slow-prompts` prompts of a workload (throughput at a fixed batch size
does not depend on how many batches run); the table says how many prompts each row used.

FLOPs: full fine-tuning costs 6·P·T (forward 2PT, backward 4PT). With LoRA the frozen weights
need no weight gradients, so the backward costs 2PT: we count 4·P·T (adapter terms are <1%).
Attention's sequence-quadratic FLOPs are left out of both, as in the usual MFU convention.

    PYTHONUNBUFFERED=1 python benchmarks/gpu.py --tokenizer DIR --out "$OUT/gpu.json" --skip sft
    PYTHONUNBUFFERED=1 python benchmarks/gpu.py --tokenizer DIR --out "$OUT/sft.json" --skip generate vllm \
        --data DATA --sft-configs original today padding_free   # (benchmarks/gpu_sft_run.sh: the parts)

The vLLM rows need vLLM (`--skip vllm` or no vLLM installed: the rest still runs).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/gpu.py` from the repository root
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_sft  # noqa: E402

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


def build_model(device: str = "cuda") -> Any:
    """Random bf16 weights; on `meta` nothing is allocated (to count parameters)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**QWEN25_7B)
    torch.manual_seed(0)
    with torch.device(device):
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


def model_dir_for_vllm(tokenizer_dir: str | Path, out_dir: str | Path) -> Path:
    """A local model directory vLLM can load with `load_format="dummy"`: Qwen2.5-7B's config
    (bf16) and the tokenizer files of `tokenizer_dir`. The tokenizer's ids must stay below Qwen's
    vocabulary (the config's larger vocabulary pads it); eos is the tokenizer's."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tok) > QWEN25_7B["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tok)} tokens, more than the model's {QWEN25_7B['vocab_size']}")
    tok.save_pretrained(out)
    eos = tok.eos_token_id
    config = {**QWEN25_7B, "torch_dtype": "bfloat16", "bos_token_id": tok.bos_token_id, "eos_token_id": eos}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "bos_token_id": tok.bos_token_id})
    )
    return out


def parse_workload(text: str) -> tuple[int, int]:
    """`1024x256` -> (1024 prompts, 256 new tokens)."""
    try:
        prompts, new = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PROMPTSxTOKENS, e.g. 1024x256") from None
    if prompts < 1 or new < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both numbers must be positive")
    return prompts, new


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="a local chat tokenizer directory (required)")
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument(
        "--workloads",
        type=parse_workload,
        nargs="+",
        default=[(128, 128), (1024, 256)],
        help="PROMPTSxTOKENS",
    )
    ap.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[128], help="TransformersTeacher batch sizes"
    )
    ap.add_argument(
        "--slow-prompts", type=int, default=256, help="prompts for the transformers ways (the original: /4)"
    )
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    ap.add_argument("--skip", nargs="*", default=[], choices=["generate", "vllm", "sft"])
    gpu_sft.add_arguments(ap)
    args = ap.parse_args(argv)
    if not args.tokenizer and not args.sft_worker:
        ap.error("--tokenizer is required")
    return args


def bound_fields(
    r: dict[str, Any], params: int, limits: dict[str, float], avg_prompt: float, new: int
) -> None:
    ctx = int(avg_prompt + new / 2)
    bound = decode_bound(params, r["batch"], ctx, limits["copy_bandwidth_Bps"])
    r["bandwidth_bound_tokens_per_s"] = bound
    r["fraction_of_bound"] = r["tokens_per_s"] / bound
    r["compute_bound_tokens_per_s"] = limits["bf16_matmul_flops"] / (2 * params)
    r["fraction_of_compute"] = r["tokens_per_s"] / r["compute_bound_tokens_per_s"]


def bench_vllm(tok: Any, qs: list[str], new: int, teacher: Any) -> list[dict[str, Any]]:
    """Plain vLLM and the project's backend on the same prompts, in the same engine; best of two
    alternating runs each (the first run of a workload also warms up its batch shapes)."""
    from vllm import SamplingParams

    from glyph_core.prompts import latent_messages
    from glyph_core.teachers.base import GenRequest

    teacher.cfg = teacher.cfg.model_copy(update={"max_new_tokens": new})
    reqs = [GenRequest(id=f"q{i}", messages=latent_messages(q)) for i, q in enumerate(qs)]
    texts = [tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True) for r in reqs]
    plain_params = SamplingParams(temperature=0.0, max_tokens=new)

    def plain() -> int:
        outs = teacher.llm.generate(texts, plain_params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def ours() -> int:
        return sum(c[0].completion_tokens for c in teacher.generate(reqs, 1))

    teacher.generate(reqs[:8], 1)  # warm-up of the sampler and the small batch shapes
    best: dict[str, dict[str, Any]] = {}
    for _ in range(2):
        for label, fn in (("plain vLLM (LLM.generate)", plain), ("ours (VLLMTeacher)", ours)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = fn()
            secs = time.perf_counter() - t0
            r = {"way": label, "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs}
            if label not in best or r["tokens_per_s"] > best[label]["tokens_per_s"]:
                best[label] = r
    max_seqs = int(teacher.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
    return [{**r, "batch": min(len(qs), max_seqs), "prompts": len(qs)} for r in best.values()]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.sft_worker:  # one SFT configuration, in the process benchmarks/gpu_sft.py started
        gpu_sft.worker(args.sft_worker)
        return

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from glyph_core.prompts import latent_messages

    console = Console()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "args": {**vars(args), "workloads": [f"{p}x{n}" for p, n in args.workloads]},
    }

    def save() -> None:  # after every section: a later crash keeps what was measured
        out_path.write_text(json.dumps(result, indent=2))

    limits = measure_limits()
    result["limits"] = limits
    console.print(
        f"[bold]{result['device']}[/]: copy {limits['copy_bandwidth_Bps'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {limits['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s"
    )
    model = build_model("meta" if "generate" in args.skip else "cuda")
    params = n_params(model)
    result["params"] = params
    all_qs = questions(max(p for p, _ in args.workloads))
    gen_rows: list[dict[str, Any]] = []
    avg_prompt: dict[str, float] = {}
    for prompts, new in args.workloads:
        qs = all_qs[:prompts]
        name = f"{prompts}x{new}"
        rendered = [
            tok.apply_chat_template(latent_messages(q), tokenize=False, add_generation_prompt=True)
            for q in qs
        ]  # counted as text -> ids: apply_chat_template(tokenize=True) returns a dict in transformers 5
        avg_prompt[name] = sum(
            len(ids) for ids in tok(rendered, add_special_tokens=False)["input_ids"]
        ) / len(qs)
        if "generate" in args.skip:
            continue
        few = qs[: max(8, args.slow_prompts // 4)]
        orig = bench_original(model, tok, few, new)
        gen_rows.append(
            {"workload": name, "way": "original (unsorted, padded)", "batch": 8, "prompts": len(few), **orig}
        )
        for b in args.batch_sizes:
            some = qs[: max(b, args.slow_prompts)]
            gen_rows.append(
                {
                    "workload": name,
                    "way": "ours (TransformersTeacher)",
                    "batch": b,
                    "prompts": len(some),
                    **bench_ours(model, tok, some, b, new),
                }
            )
        result["generation"] = gen_rows
        save()
    del model
    gc.collect()
    torch.cuda.empty_cache()

    vllm_ok = "vllm" not in args.skip and importlib.util.find_spec("vllm") is not None
    if "vllm" not in args.skip and not vllm_ok:
        console.print("[yellow]vLLM is not installed: its rows are skipped[/]")
    if vllm_ok:
        from glyph_core.config import TeacherConfig
        from glyph_core.teachers.vllm_backend import VLLMTeacher

        model_dir = model_dir_for_vllm(args.tokenizer, Path(tempfile.mkdtemp(prefix="qwen7b-dummy-")))
        cfg = TeacherConfig(
            backend="vllm",
            model=str(model_dir),
            temperature=0.0,
            dtype="bfloat16",
            vllm={
                "gpu_memory_utilization": args.gpu_memory_utilization,
                "engine_args": {"load_format": "dummy"},
            },
        )
        t0 = time.perf_counter()
        teacher = VLLMTeacher(cfg)
        result["vllm_engine_start_s"] = time.perf_counter() - t0
        import vllm

        result["vllm"] = vllm.__version__
        for prompts, new in args.workloads:
            for r in bench_vllm(tok, all_qs[:prompts], new, teacher):
                gen_rows.append({"workload": f"{prompts}x{new}", **r})
            result["generation"] = gen_rows
            save()
        teacher.close()
        shutil.rmtree(model_dir, ignore_errors=True)

    table = Table(title=f"Generation, Qwen2.5-7B architecture ({params / 1e9:.2f}B params, bf16)")
    for col in ("workload", "way", "batch", "prompts", "tokens/s", "× original", "% compute", "% bandwidth"):
        table.add_column(col, justify="right")
    for name in dict.fromkeys(r["workload"] for r in gen_rows):
        rows = [r for r in gen_rows if r["workload"] == name]
        orig_rows = [r for r in rows if r["way"].startswith("original")]
        prompts, new = (int(x) for x in name.split("x"))
        for r in rows:
            bound_fields(r, params, limits, avg_prompt[name], new)
            r["ratio_to_original"] = r["tokens_per_s"] / orig_rows[0]["tokens_per_s"] if orig_rows else None
            table.add_row(
                name,
                r["way"],
                str(r["batch"]),
                str(r["prompts"]),
                f"{r['tokens_per_s']:.0f}",
                f"{r['ratio_to_original']:.1f}" if r["ratio_to_original"] else "–",
                f"{100 * r['fraction_of_compute']:.1f}%",
                f"{100 * r['fraction_of_bound']:.0f}%",
            )
        ours_v = next((r for r in rows if r["way"] == "ours (VLLMTeacher)"), None)
        plain_v = next((r for r in rows if r["way"].startswith("plain vLLM")), None)
        if ours_v and plain_v:
            result.setdefault("vllm_backend_vs_plain", {})[name] = (
                ours_v["tokens_per_s"] / plain_v["tokens_per_s"]
            )
    result["generation"] = gen_rows
    save()

    sft_table = None
    if "sft" not in args.skip:
        runs = gpu_sft.run(args, tok, params, limits, out_path.parent)
        result["sft"] = runs
        result["sft_rows"] = {"kind": args.sft_rows, "max_seq_len": args.sft_seq_len}
        save()
        sft_table = gpu_sft.table(
            runs,
            f"LoRA SFT (r 16, all linear layers, bf16), {gpu_sft.ROWS_PER_STEP} rows a step, "
            f"{args.sft_rows} rows ≤ {args.sft_seq_len} tokens",
        )

    console.print(f"wrote {out_path}")
    for name, ratio in result.get("vllm_backend_vs_plain", {}).items():
        console.print(f"{name}: project's vllm backend / plain vLLM = {ratio:.3f}")
    if gen_rows:
        console.print(table)
    if sft_table is not None:
        console.print(sft_table)


if __name__ == "__main__":
    main()
