"""Scaling on one host with several GPUs: generation and SFT tokens/s on 1 and N GPUs.

    python benchmarks/multi_gpu.py                       # all visible GPUs, SmolLM2-135M
    python benchmarks/multi_gpu.py --gpus 2 --model Qwen/Qwen2.5-0.5B-Instruct --problems 512

*generation*: the same problems, shard size and teacher, generated into a fresh store by one
worker on one GPU, then by N workers, one process per GPU (``CUDA_VISIBLE_DEVICES=<i>``, each
generating its round-robin shard group with ``glyph_core.generate.generate_shard_group``, as
the deployed fan-out's child runs do), followed by the final pass that concatenates. Rate:
completion tokens of the whole run over the slowest worker's generation seconds (model loading
left out, as it is in a long run); ``tokens_per_s_wall`` includes process start and loading.

*SFT*: ``train_sft`` through ``accelerate launch`` with ``num_gpus=1`` and ``num_gpus=N``
(same per-device batch, so N GPUs see N times the rows per step). Rate: non-padding tokens
seen over training seconds, from the trainer's log history (the manifest's metrics).

Scaling efficiency = N-GPU rate / (N x 1-GPU rate). Results go to ``--out`` as JSON.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends) in every child.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=None, help="N (default: every visible GPU)")
    ap.add_argument("--model", default="smollm2-135m", help="teacher and student (alias, path or Hub id)")
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=16, help="teacher batch size")
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--sft-batch", type=int, default=8, help="per device")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--skip", choices=["generate", "sft"], action="append", default=[])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "multi_gpu.json")
    # internal: one generation worker (a child process of this script)
    ap.add_argument(
        "--group-worker", nargs=3, metavar=("WORKER", "WORKERS", "ARGS_JSON"), help=argparse.SUPPRESS
    )
    return ap.parse_args(argv)


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def child_env(gpu: int | None = None) -> dict[str, str]:
    from glyph_core.launch import child_env as base

    env = base()
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


# -- generation --------------------------------------------------------------------------------


def problems_table(n: int) -> Any:
    import pyarrow as pa

    rows = []
    for i in range(n):
        a, b, c = 3 + i % 17, 5 + i % 11, 2 + i % 7
        q = f"A shop has {a} boxes with {b} apples each and sells {c} apples. How many apples are left?"
        rows.append(
            {
                "id": f"bench-{i}",
                "source": "gsm8k",
                "split": "train",
                "question": q,
                "solution": "",
                "answer": str(a * b - c),
                "type": None,
            }
        )
    return pa.Table.from_pylist(rows)


def gen_cfg(args: argparse.Namespace, workers: int) -> Any:
    from glyph_core.config import GenerateConfig, TeacherConfig

    teacher = TeacherConfig(
        backend=args.backend,
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        temperature=0.7,
        batch_size=args.gen_batch,
    )
    return GenerateConfig(teacher=teacher, shard_size=args.shard_size, workers=workers)


def group_worker(worker: int, workers: int, args_json: str) -> None:
    from glyph_core.config import GenerateConfig
    from glyph_core.generate import generate_shard_group
    from glyph_core.storage import DatasetRef, Store

    spec = json.loads(Path(args_json).read_text())
    res = generate_shard_group(
        Store(spec["store"]),
        DatasetRef.model_validate(spec["problems"]),
        GenerateConfig.model_validate(spec["cfg"]),
        worker,
        workers,
    )
    print(
        json.dumps(
            {
                "worker": worker,
                "generated": res.generated,
                "tokens": res.completion_tokens,
                "generate_s": res.generate_s,
            }
        )
    )


def bench_generate(args: argparse.Namespace, n_gpus: int, tmp: Path) -> dict[str, Any]:
    import pyarrow.compute as pc

    from glyph_core.generate import generate_traces
    from glyph_core.storage import Store

    store = Store(tmp / f"gen-{n_gpus}")
    ref = store.write_table(problems_table(args.problems), "unify", "bench")
    cfg = gen_cfg(args, n_gpus)
    spec = tmp / f"gen-{n_gpus}.json"
    spec.write_text(
        json.dumps(
            {"store": store.root, "problems": ref.model_dump(mode="json"), "cfg": cfg.model_dump(mode="json")}
        )
    )
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--group-worker", str(w), str(n_gpus), str(spec)],
            env=child_env(w),
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(n_gpus)
    ]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise SystemExit(f"a generation worker failed: {[p.returncode for p in procs]}")
    final = generate_traces(store, ref, cfg)  # concatenation only; counts any shard left over
    traces = store.read_table(final.ref)
    tokens = int(pc.sum(traces["completion_tokens"]).as_py() or 0)
    workers = [json.loads(o.strip().splitlines()[-1]) for o in outs if o.strip()]
    # Rate over the slowest worker's generation time (model loading excluded, as in a long
    # run); the wall-clock rate, loading included, is reported beside it.
    gen_s = max((w["generate_s"] for w in workers), default=0.0)
    return {
        "gpus": n_gpus,
        "wall_s": wall,
        "generate_s": gen_s,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / gen_s if gen_s else 0.0,
        "tokens_per_s_wall": tokens / wall,
        "shards": final.shards_total,
        "final_pass_generated": final.shards_generated,
        "workers": workers,
    }


# -- SFT ---------------------------------------------------------------------------------------


def sft_rows(n: int, seq_len: int) -> Any:
    import pyarrow as pa

    rows = []
    for i in range(n):
        body = " ".join(f"step {k}: {i} + {k} = {i + k}." for k in range(max(4, seq_len // 12)))
        rows.append(
            {
                "id": f"r{i}",
                "messages": [
                    {"role": "user", "content": f"Add {i} to each number up to {seq_len // 12}."},
                    {"role": "assistant", "content": body},
                ],
            }
        )
    return pa.Table.from_pylist(rows)


def bench_sft(args: argparse.Namespace, n_gpus: int, tmp: Path) -> dict[str, Any]:
    from glyph_core.config import TrainConfig
    from glyph_core.launch import run_training

    cfg = TrainConfig(
        base_model=args.model,
        method="lora",
        max_steps=args.sft_steps,
        batch_size=args.sft_batch,
        grad_accum=1,
        max_seq_len=args.seq_len,
        save_steps=10**6,
        num_gpus=n_gpus,
        launcher="accelerate",
        lr_scheduler="constant",
    )
    rows = sft_rows(args.sft_batch * n_gpus * args.sft_steps, args.seq_len)
    t0 = time.perf_counter()
    result = run_training(rows, cfg, tmp / f"sft-{n_gpus}")  # launcher="accelerate": always launched
    m = {**result.manifest["metrics"], **result.run}  # the timing is in `run`, not the manifest
    return {
        "gpus": n_gpus,
        "wall_s": time.perf_counter() - t0,
        "steps": m["steps"],
        "tokens_seen": m["tokens_seen"],
        "train_seconds": m["train_seconds"],
        "tokens_per_s": m["tokens_per_s"],
        "final_loss": m["final_loss"],
    }


def efficiency(one: dict[str, Any], many: dict[str, Any]) -> float:
    return (
        many["tokens_per_s"] / (many["gpus"] * one["tokens_per_s"]) if one["tokens_per_s"] else float("nan")
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.group_worker:
        w, k, spec = args.group_worker
        group_worker(int(w), int(k), spec)
        return 0
    visible = visible_gpus()
    n = args.gpus if args.gpus is not None else visible
    if visible < 2 or n < 2 or n > visible:
        print(
            f"multi_gpu.py needs at least 2 GPUs: {visible} visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}), --gpus {n}. "
            "Run it on a several-GPU host; nothing was measured.",
            file=sys.stderr,
        )
        return 2
    report: dict[str, Any] = {
        "host": platform.node(),
        "gpus": n,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    import torch

    report["gpu_name"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory(prefix="glyph-multi-gpu-") as td:
        tmp = Path(td)
        for name, fn in (("generate", bench_generate), ("sft", bench_sft)):
            if name in args.skip:
                continue
            one, many = fn(args, 1, tmp), fn(args, n, tmp)
            report[name] = {"1": one, str(n): many, "scaling_efficiency": efficiency(one, many)}
            print(
                f"{name:8s} 1 GPU {one['tokens_per_s']:10.1f} tok/s   {n} GPUs {many['tokens_per_s']:10.1f} tok/s"
                f"   efficiency {report[name]['scaling_efficiency']:.2f}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
