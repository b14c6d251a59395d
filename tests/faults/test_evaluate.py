"""Evaluate fails closed: when a model's generation mostly fails, the stage fails and publishes
nothing, instead of a believable 0 % table; errors within the budget are counted and shown.

Before: every error completion was scored as a wrong answer without a glyph, the table and
metrics were published and cached (`evaluate.max_new_tokens=0` gave a 0 % result, exit 0), and
the summary table had no error counts.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from glyph_core import evaluate, unify
from glyph_core.config import EvalConfig, UnifyConfig
from glyph_core.errors import ErrorBudgetExceeded
from glyph_core.storage import DatasetRef, ModelRef, Store


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model directory that loads but cannot generate: its embedding table has 8 rows
    and its tokenizer 49k ids (the mismatch a bad conversion leaves), so every batch fails."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from glyph_core.models import tiny_model_dir

    tiny = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny, out)
    config = AutoConfig.from_pretrained(out)
    config.vocab_size = 8
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture
def problems(tiny_data_dir: Path, tmp_path: Path) -> tuple[Store, DatasetRef]:
    store = Store(tmp_path / "store").ensure()
    cfg = UnifyConfig(
        data_dir=str(tiny_data_dir), max_train_per_source=2, max_test_per_source=2, svamp_holdout=10
    )
    return store, unify.run(store, cfg).refs["problems"]  # type: ignore[return-value]


def _base(path: Path) -> ModelRef:
    digest = hashlib.sha256(str(path).encode()).hexdigest()
    return ModelRef(uri=str(path), sha256=digest, base_model=str(path), kind="base")


CFG = EvalConfig(per_stratum=1, max_new_tokens=4, batch_size=8)


def test_a_model_that_cannot_generate_fails_the_stage(problems, broken_model: Path) -> None:  # type: ignore[no-untyped-def]
    store, ref = problems
    with pytest.raises(ErrorBudgetExceeded) as exc:
        evaluate.run(store, CFG, problems=ref, model=_base(broken_model))
    message = str(exc.value)
    assert (
        message.startswith("evaluate: ") and "completions of the base model failed (IndexError x" in message
    )
    assert f"model {broken_model}" in message and "evaluate.max_error_rate=0.02" in message
    assert "Nothing was published" in message and "\n" not in message
    assert not (Path(store.root) / "evaluate").exists() or not any(
        (Path(store.root) / "evaluate").rglob("*.parquet")
    )


def test_errors_within_the_budget_are_counted_not_cached(problems, broken_model: Path) -> None:  # type: ignore[no-untyped-def]
    store, ref = problems
    cfg = CFG.model_copy(update={"max_error_rate": 1.0})
    assert evaluate.key(cfg, problems=ref, model=_base(broken_model)) == evaluate.key(
        CFG, problems=ref, model=_base(broken_model)
    )  # the budget decides whether a result exists, not what it is
    out = evaluate.run(store, cfg, problems=ref, model=_base(broken_model))
    assert out.stats.errors == out.stats.rows_out > 0
    assert not list(Path(store.root, "evaluate").rglob("completions.ref.json"))  # asked again next run


def test_the_summary_table_shows_errors_per_stage(capsys: pytest.CaptureFixture[str]) -> None:
    from glyph_cli.run_summary import print_summary

    row = {"stage": "generate", "cached": False, "seconds": 1.0, "stage_seconds": 0.9, "overhead_seconds": 0.1,
           "rows_in": 40, "rows_out": 40, "errors": 3, "drops": {}, "uri": "/s/generate/k/data.parquet"}  # fmt: skip
    print_summary({"profile": "tiny", "store": "/s", "seconds": 1.0, "stages": [row]})
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "stage" in line and "rows in" in line)
    values = next(line for line in out.splitlines() if "generate" in line)
    column = header.index("errors")
    assert values[column : column + len("errors")].strip() == "3"
