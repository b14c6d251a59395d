"""`benchmarks/gpu_sft.py` end to end on the CPU with the tiny random llama: every configuration
in its own process, a failing one recorded and the next one run, the table built.

The GPU numbers themselves come from the device run (benchmarks/results/); this checks that the
one command the integrator runs there cannot stop half-way on a configuration that fails.
"""

from __future__ import annotations

import argparse

import pytest

from benchmarks import gpu_sft
from glyph_core.config import TrainConfig


def test_every_sft_configuration_is_a_valid_train_config():
    for name, (_, overrides) in gpu_sft.SFT_CONFIGS.items():
        cfg = TrainConfig(**overrides)
        assert cfg.batch_size * cfg.grad_accum == gpu_sft.ROWS_PER_STEP, name


def test_uniform_rows_have_the_asked_length():
    from transformers import AutoTokenizer

    from glyph_core.models import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    rows = gpu_sft.uniform_rows(tok, 3, 200)
    for row in rows.to_pylist():
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        assert abs(len(tok(text, add_special_tokens=False)["input_ids"]) - 200) <= 8


def test_sections_run_in_their_own_processes_and_a_failure_is_recorded(tmp_path):
    from transformers import AutoTokenizer

    from glyph_core.models import tiny_model_dir

    model = tiny_model_dir("llama")
    args = argparse.Namespace(
        sft_configs=["today", "liger", "padding_free"],
        sft_rows="uniform",
        data=None,
        sft_seq_len=64,
        sft_steps=1,
        sft_warmup=1,
        sft_timeout=300,
        sft_model_dir=str(model),
        sft_device="cpu",
    )
    runs = gpu_sft.run(
        args, AutoTokenizer.from_pretrained(model), 10**6, {"bf16_matmul_flops": 1e12}, tmp_path
    )
    by = {r["name"]: r for r in runs}
    assert by["today"]["status"] == "ok" and by["padding_free"]["status"] == "ok"
    assert (
        by["liger"]["status"] == "failed" and "liger_kernel=true needs a CUDA device" in by["liger"]["error"]
    )
    # the same rows in the same order: the same tokens and losses, padded or not
    assert by["today"]["tokens"] == by["padding_free"]["tokens"] > 0
    assert by["today"]["losses"] == pytest.approx(by["padding_free"]["losses"], rel=1e-5)
    assert by["padding_free"]["speed"]["padding_free"] and not by["today"]["speed"]["padding_free"]
    assert by["today"]["mfu_lora_4PT"] == pytest.approx(4 * 10**6 * by["today"]["tokens_per_s"] / 1e12)
    assert by["padding_free"]["max_loss_diff_to_today"] < 1e-4
    assert gpu_sft.table(runs, "t").row_count == 3


def test_loss_check_runs_end_to_end_on_real_rows(tmp_path, tiny_data_dir):
    """On a CPU `auto` resolves to today's settings, so the two seed-0 runs must agree exactly:
    the script's own verdict, files and tokens are what is checked here."""
    import json

    from benchmarks import sft_loss_check
    from glyph_core.models import tiny_model_dir

    out = tmp_path / "check"
    rc = sft_loss_check.main(
        [
            "--data",
            str(tiny_data_dir),
            "--model",
            str(tiny_model_dir("llama")),
            "--steps",
            "2",
            "--seq-len",
            "192",
            "--out",
            str(out),
        ]
    )
    data = json.loads((out / "loss_check.json").read_text())
    assert rc == 0 and data["summary"]["same_tokens_every_step"] and data["summary"]["within_noise"]
    assert data["summary"]["fast_vs_current"]["max_abs_diff"] < 1e-4
    assert len(data["runs"]["fast"]["loss"]) == 2
    assert (out / "loss_check.png").stat().st_size > 0 and "| fast |" in (out / "loss_check.md").read_text()
