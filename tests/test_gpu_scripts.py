"""What the GPU scripts do without a GPU: argument parsing, the dummy-model directory for vLLM,
the run script's settings, the agreement of two evaluations, and the checks' verdicts.

The GPU parts themselves (vLLM engines, CUDA memory, throughput) run only on a GPU host
(benchmarks/vllm_check.py, benchmarks/gpu.py, benchmarks/gpu_vllm_run.sh); vLLM cannot be
installed here.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks import agreement, vllm_check
from tests import fixtures_models as fm

tiny_model = fm.tiny_model
REPO = Path(__file__).resolve().parents[1]

# -- benchmarks/gpu.py --------------------------------------------------------------------------


def test_gpu_benchmark_arguments_and_workloads() -> None:
    from benchmarks import gpu

    args = gpu.parse_args(["--tokenizer", "tok"])
    assert args.workloads == [(128, 128), (1024, 256)]
    assert gpu.parse_args(["--tokenizer", "t", "--workloads", "64x32", "--skip", "vllm", "sft"]).skip == [
        "vllm",
        "sft",
    ]
    with pytest.raises(SystemExit):
        gpu.parse_args(["--tokenizer", "t", "--workloads", "1024"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--tokenizer", "t", "--workloads", "0x5"])


def test_dummy_model_dir_is_a_qwen_7b_config_with_the_tokenizer(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from benchmarks import gpu

    out = gpu.model_dir_for_vllm(tiny_model, tmp_path / "m")
    cfg = AutoConfig.from_pretrained(out)  # what vLLM reads for load_format="dummy"
    assert cfg.model_type == "qwen2" and cfg.hidden_size == 3584 and cfg.num_hidden_layers == 28
    assert cfg.vocab_size == 152064 and cfg.num_key_value_heads == 4
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) <= cfg.vocab_size and cfg.eos_token_id == tok.eos_token_id
    assert tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_bounds_fields() -> None:
    from benchmarks import gpu

    limits = {"copy_bandwidth_Bps": 3e12, "bf16_matmul_flops": 7.8e14}
    r = {"batch": 256, "tokens_per_s": 13_800.0}
    gpu.bound_fields(r, 7_615_616_512, limits, avg_prompt=150, new=256)
    assert r["compute_bound_tokens_per_s"] == pytest.approx(7.8e14 / (2 * 7_615_616_512))
    assert 0 < r["fraction_of_compute"] < 1 and 0 < r["fraction_of_bound"] < 1


# -- benchmarks/vllm_check.py -------------------------------------------------------------------


def test_vllm_check_arguments_and_problems(tmp_path: Path) -> None:
    args = vllm_check.parse_args(["--out", str(tmp_path), "--skip", "resume"])
    assert args.skip == ["resume"] and args.det_eager and args.shards >= 4
    rows = vllm_check.questions(10, None)
    assert len({r["id"] for r in rows}) == 10 and all(r["split"] == "train" and r["question"] for r in rows)
    assert vllm_check.questions(10, None) == rows  # the same problems on every run


def test_vllm_check_reads_real_questions(tmp_path: Path) -> None:
    if not fm.DATA_DIR.is_dir():
        pytest.skip("real data not found")
    rows = vllm_check.questions(5, str(fm.DATA_DIR))
    assert len(rows) == 5 and all(r["source"] == "gsm8k" and r["answer"] for r in rows)


def test_nvidia_smi_parsing() -> None:
    assert vllm_check.nvidia_smi_used_mib("1234\n") == 1234
    assert vllm_check.nvidia_smi_used_mib("81559 \n100\n") == 81559  # GPU 0
    assert vllm_check.nvidia_smi_used_mib("") is None
    assert vllm_check.nvidia_smi_used_mib("[N/A]") is None


def test_shard_comparison_and_verdicts(tmp_path: Path) -> None:
    for store, payloads in (("a", {"k1": b"x", "k2": b"y"}), ("b", {"k1": b"x", "k2": b"z"})):
        for key, data in payloads.items():
            d = tmp_path / store / "generate" / "shards" / key
            d.mkdir(parents=True)
            (d / "data.parquet").write_bytes(data)
    cmp = vllm_check.compare_shards(
        vllm_check.shard_files(str(tmp_path / "a")), vllm_check.shard_files(str(tmp_path / "b"))
    )
    assert cmp == {"shards": 2, "identical": 1, "differ": ["k2"]}
    mem = {
        k: {"torch_allocated_MiB": 10.0, "nvidia_smi_used_MiB": 600}
        for k in ("before", "after_close", "after_second_close")
    }
    mem["with_engine"] = {"torch_allocated_MiB": 70_000.0, "nvidia_smi_used_MiB": 72_000}
    good = {
        "lora": {"prompts": 8, "tuned_differs_from_base": 7},
        "memory": {**mem, "second_engine_ok": True},
        "resume": {
            "shards_when_killed": 2,
            "kept_unchanged": True,
            **cmp,
            "batch_invariant": False,
            "eager": True,
        },
    }
    assert vllm_check.failures(good) == []
    assert "7/8" in vllm_check.table(good) and "1/2" in vllm_check.table(good)
    bad = {**good, "lora": {"prompts": 8, "tuned_differs_from_base": 0}}
    bad["memory"] = {
        **mem,
        "second_engine_ok": False,
        "after_close": {"torch_allocated_MiB": 9000.0, "nvidia_smi_used_MiB": 1},
    }
    assert len(vllm_check.failures(bad)) == 3
    # What the H100 showed: CUDA context and allocator slack stay, the engine's memory goes.
    h100 = {**good, "memory": {**good["memory"], "before": {"torch_allocated_MiB": 64.0}}}
    h100["memory"]["with_engine"] = {"torch_allocated_MiB": 68_967.0}
    h100["memory"]["after_close"] = {"torch_allocated_MiB": 189.0}
    assert vllm_check.failures(h100) == []


# -- benchmarks/agreement.py --------------------------------------------------------------------


def _scored(rows: list[tuple[str, str, str, bool]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "model": m,
                "id": i,
                "completion": c,
                "emerged": "🜞" in c,
                "valid": False,
                "pred": c[-1:],
                "correct": ok,
            }
            for m, i, c, ok in rows
        ]
    )


def test_agreement_of_two_small_tables(tmp_path: Path) -> None:
    a = _scored(
        [
            ("base", "p1", "the answer is 4", True),
            ("base", "p2", "so 7", False),
            ("tuned", "p1", "🜞 x 4", True),
            ("tuned", "p2", "🜞 y 5", False),
        ]
    )
    b = _scored(
        [
            ("base", "p1", "the answer is 4", True),
            ("base", "p2", "thus 7", False),
            ("tuned", "p1", "🜞 x 4", True),
            ("tuned", "p2", "🜞 z 6", True),
        ]
    )
    pq.write_table(a, tmp_path / "a.parquet")
    pq.write_table(b, tmp_path / "b.parquet")
    assert (
        agreement.main(
            [
                "--a",
                str(tmp_path / "a.parquet"),
                "--b",
                str(tmp_path / "b.parquet"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "o" / "agreement.json").read_text())["models"]
    assert (res["base"]["exact"], res["base"]["same_scores"], res["base"]["n"]) == (
        1,
        2,
        2,
    )  # "so 7" vs "thus 7"
    assert (res["tuned"]["exact"], res["tuned"]["same_scores"], res["tuned"]["same_correct"]) == (1, 1, 1)
    assert res["tuned"]["examples"][0]["common_prefix_chars"] == len("🜞 ")
    assert "| base | 2 | 1 (50.0%)" in (tmp_path / "o" / "agreement.md").read_text()


def test_agreement_refuses_different_problem_sets(tmp_path: Path) -> None:
    a = _scored([("base", "p1", "x", True)])
    b = _scored([("base", "p2", "x", True)])
    with pytest.raises(SystemExit, match="different problems"):
        agreement.compare(a.to_pylist(), b.to_pylist())


def test_agreement_finds_each_backends_latest_evaluation(tmp_path: Path) -> None:
    import os

    store = tmp_path / "store"
    for key, backend, mtime in (("k1", "vllm", 100), ("k2", "transformers", 100), ("k3", "vllm", 200)):
        d = store / "evaluate" / key
        d.mkdir(parents=True)
        pq.write_table(_scored([("base", "p1", f"from {key}", True)]), d / "scored.parquet")
        (d / "metrics.json").write_text(json.dumps({"config": {"backend": backend}}))
        (d / "table.md").write_text(f"table {key}")
        os.utime(d / "metrics.json", (mtime, mtime))
    assert agreement.latest_evaluation(store, "vllm") == store / "evaluate" / "k3"
    assert agreement.main(["--store", str(store), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "vllm" / "table.md").read_text() == "table k3"
    assert (tmp_path / "o" / "transformers" / "table.md").read_text() == "table k2"
    with pytest.raises(SystemExit, match="no finished evaluation with backend 'sglang'"):
        agreement.latest_evaluation(store, "sglang")


# -- benchmarks/gpu_vllm_run.sh -----------------------------------------------------------------


def test_run_script_settings_are_valid_for_the_demo_profile() -> None:
    """Every `--set` of the run script is a real setting with a valid value (catches drift of the
    configuration), and the two evaluations differ only in the backend."""
    from glyph_core.profiles import load_profile, parse_sets

    text = (REPO / "benchmarks" / "gpu_vllm_run.sh").read_text()
    sets = [s.rstrip(")") for s in re.findall(r"--set (\S+)", text)]
    swaps = {"evaluate.backend=transformers", "generate.teacher.backend=reference"}
    cfg = load_profile("demo", parse_sets([s for s in sets if s not in swaps]))
    assert cfg.evaluate.backend == "vllm" and cfg.generate.teacher.backend == "vllm"
    assert cfg.evaluate.per_stratum is None and cfg.train.device == "cuda"
    other = load_profile("demo", parse_sets([s for s in sets if s not in {"evaluate.backend=vllm"}]))
    assert other.evaluate.backend == "transformers"
    assert other.evaluate.key_dump() == {**cfg.evaluate.key_dump(), "backend": "transformers"}


def test_run_script_refuses_unknown_parts_and_missing_data(tmp_path: Path) -> None:
    script = REPO / "benchmarks" / "gpu_vllm_run.sh"
    proc = subprocess.run(
        ["bash", str(script), "nonsense"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)},
    )
    assert proc.returncode == 2 and "unknown part nonsense" in proc.stderr
    proc = subprocess.run(
        ["bash", str(script), "agreement"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "GLYPH_DATA_DIR": str(tmp_path / "none")},
    )
    assert proc.returncode == 2 and "GLYPH_DATA_DIR" in proc.stderr


def test_scoring_change_names_a_cut_off_guess(tmp_path: Path) -> None:
    """benchmarks/scoring_change.py with this checkout as the "old" one: its subprocess scores
    without the finish reason, so a cut-off completion whose last number is the gold answer is
    correct there and has no prediction here; a completion with 🝞 is scored alike by both."""
    from benchmarks import scoring_change

    rows = [
        {"model": "tuned", "bucket": "hard", "gold": "42", "finish_reason": "length",
         "completion": "We compute 6 * 7 and the modulus is 42"},
        {"model": "tuned", "bucket": "easy", "gold": "5", "finish_reason": "stop",
         "completion": "🜞 add\n🜆 sum\n🜂 2 + 3 = 5\n🜃 done\n🝞 5"},
    ]  # fmt: skip
    path = tmp_path / "completions.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    res = scoring_change.compare(path, scoring_change.REPO)
    by = {(e["model"], e["bucket"]): e for e in res["by_group"]}
    assert by[("tuned", "hard")]["correct"] == {"old": 1.0, "new": 0.0, "change": -1.0}
    assert by[("tuned", "easy")]["correct"]["change"] == 0.0
    assert by[("tuned", "easy")]["valid"] == {"old": 1.0, "new": 1.0, "change": 0.0}
    assert res["changed_verdicts"] == {
        "correct → wrong: cut off, no explicit answer (no last-number guess)": 1
    }
