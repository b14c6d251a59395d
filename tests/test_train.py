"""The train stage with a tiny random llama (SmolLM2's tokenizer and chat template): seconds per run.

What must hold: the loss goes down; the saved adapter reloads to the same outputs; a crashed run
resumes from its last checkpoint to the same weights as an uninterrupted one; merged and full
fine-tuning write plain model directories; bad input fails before any model loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from glyph_core import train
from glyph_core.config import LoraConfig, TrainConfig
from glyph_core.errors import GlyphError
from glyph_core.models import check_model_dir
from glyph_core.storage import Store
from glyph_core.trainer import metrics_table, to_prompt_completion, train_sft

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny() -> str:
    from glyph_core.models import tiny_model_dir

    return str(tiny_model_dir("llama"))


def sft_rows(n: int = 12) -> pa.Table:
    rows = []
    for i in range(n):
        glyph = i % 2 == 0
        answer = (
            f"\U0001f71e add\n\U0001f706 sum the numbers\n\U0001f702 {i} + {i} = {2 * i}\n\U0001f703 done\n\U0001f75e {2 * i}"
            if glyph
            else f"The sum is {2 * i}."
        )
        rows.append(
            {
                "id": f"row-{i}",
                "kind": "glyph" if glyph else "natural",
                "messages": [
                    {"role": "user", "content": f"What is {i} + {i}?"},
                    {"role": "assistant", "content": answer},
                ],
            }
        )
    return pa.Table.from_pylist(rows)


def cfg_for(model: str, **kw) -> TrainConfig:
    base = dict(
        base_model=model,
        max_steps=8,
        batch_size=4,
        grad_accum=1,
        learning_rate=5e-3,
        lr_scheduler="constant",
        max_seq_len=128,
        lora=LoraConfig(r=8, alpha=16, dropout=0.0),
        num_threads=2,
        save_steps=4,
    )
    base.update(kw)
    return TrainConfig(**base)


def _inputs(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 3?"}], tokenize=False)
    return tok(text, return_tensors="pt")


def _logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


# -- pure functions -------------------------------------------------------------------------------


def test_prompt_completion_split_keeps_system_and_user_in_prompt():
    table = pa.Table.from_pylist(
        [
            {
                "id": "a",
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "ans"},
                ],
            }
        ]
    )
    (rec,) = to_prompt_completion(table)
    assert [m["role"] for m in rec["prompt"]] == ["system", "user"]
    assert rec["completion"] == [{"role": "assistant", "content": "ans"}]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "q"}], "no assistant turn"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}],
            "assistant turn is empty",
        ),
        ([{"role": "assistant", "content": "a"}], "no user turn"),
        ([], "no assistant turn"),
    ],
)
def test_bad_sft_rows_name_the_row(messages, match):
    good = sft_rows(3).to_pylist()
    good.insert(1, {"id": "bad-row", "kind": "glyph", "messages": messages})
    with pytest.raises(GlyphError, match=match) as err:
        to_prompt_completion(pa.Table.from_pylist(good, schema=sft_rows(1).schema))
    assert "row 1" in str(err.value) and "bad-row" in str(err.value)


def test_missing_messages_column_and_empty_table():
    with pytest.raises(GlyphError, match="messages"):
        to_prompt_completion(pa.table({"id": ["a"], "text": ["x"]}))
    with pytest.raises(GlyphError, match="empty"):
        to_prompt_completion(sft_rows(1).slice(0, 0))


def test_model_dir_checks_name_the_dir(tmp_path, tiny):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    (empty / "tokenizer.json").write_text("{}")
    with pytest.raises(GlyphError, match="no weights") as err:
        check_model_dir(empty)
    assert str(empty) in str(err.value)

    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((Path(tiny) / name).read_bytes())
    with pytest.raises(GlyphError, match="no tokenizer") as err:
        check_model_dir(no_tok)
    assert str(no_tok) in str(err.value)

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(GlyphError, match="no adapter weights"):
        check_model_dir(adapter)
    assert check_model_dir(tiny) == Path(tiny)


def test_train_rejects_bad_input_before_loading_a_model(tmp_path, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("a model was loaded before input validation")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    bad = pa.Table.from_pylist([{"id": "x", "messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(GlyphError, match="no assistant turn"):
        train_sft(bad, cfg_for("tiny-random"), tmp_path / "out")
    with pytest.raises(GlyphError, match="does not exist"):
        train_sft(sft_rows(2), cfg_for(str(tmp_path / "nowhere")), tmp_path / "out")


def test_metrics_table_measures_speed_from_intervals():
    history = [
        {"loss": 3.0, "step": 1, "epoch": 0.5, "num_input_tokens_seen": 100, "interval_s": 2.0},
        {"loss": 2.0, "step": 3, "epoch": 1.0, "num_input_tokens_seen": 400, "interval_s": 3.0},
        {"train_runtime": 5.0, "step": 3},
    ]
    t = metrics_table(history).to_pylist()
    assert [r["step"] for r in t] == [1, 3]
    assert t[0]["tokens_per_s"] == pytest.approx(50.0)
    assert t[1]["tokens_per_s"] == pytest.approx(100.0)  # (400 - 100) / 3 s
    assert t[1]["s_per_step"] == pytest.approx(1.5)
    assert math.isnan(t[0]["grad_norm"])


# -- training -------------------------------------------------------------------------------------


def test_lora_loss_goes_down_and_adapter_reloads_identically(tmp_path, tiny):
    cfg = cfg_for(tiny, max_steps=12, save_steps=100)
    result = train_sft(sft_rows(), cfg, tmp_path / "run")
    losses = result.metrics.column("loss").to_pylist()
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert result.metrics.column("tokens_per_s").to_pylist()[-1] > 0

    files = {p.name for p in result.model_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= files
    manifest = json.loads((result.model_dir / "manifest.json").read_text())
    assert manifest["kind"] == "lora" and manifest["base_model"] == tiny
    assert manifest["metrics"]["final_loss"] == pytest.approx(losses[-1])
    assert len(manifest["data_sha256"]) == 64

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inputs = _inputs(tiny)
    trained = _logits(result.model, inputs)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    base_logits = _logits(base, inputs)
    reloaded = PeftModel.from_pretrained(base, result.model_dir)
    again = _logits(reloaded, inputs)
    assert torch.allclose(trained, again, atol=1e-5)
    assert not torch.allclose(base_logits, again, atol=1e-3)  # the adapter does change the model


class Crash(Exception):
    pass


def _crash_after(step: int):
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Crash(f"simulated crash after step {step}")

    return CrashAt()


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, tiny):
    cfg = cfg_for(tiny, max_steps=8, save_steps=4)
    out = tmp_path / "crashy"
    with pytest.raises(Crash):
        train_sft(sft_rows(), cfg, out, callbacks=[_crash_after(6)])
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    assert not (out / "model").exists()

    resumed = train_sft(sft_rows(), cfg, out)
    assert resumed.run["resumed_from"].endswith("checkpoint-4")  # how the run went: not in the manifest
    assert "resumed_from" not in resumed.manifest
    assert resumed.metrics.column("step").to_pylist() == list(range(1, 9))  # history survives

    straight = train_sft(sft_rows(), cfg, tmp_path / "straight")
    a = dict(resumed.model.named_parameters())
    b = dict(straight.model.named_parameters())
    lora = [k for k in a if "lora_" in k]
    assert lora
    for k in lora:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_merge_and_full_write_plain_model_dirs(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    inputs = _inputs(tiny)
    merged = train_sft(sft_rows(4), cfg_for(tiny, max_steps=3, merge=True), tmp_path / "merged")
    assert merged.kind == "full"
    assert (merged.model_dir / "model.safetensors").exists()
    assert not (merged.model_dir / "adapter_config.json").exists()
    check_model_dir(merged.model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(merged.model_dir)
    assert torch.allclose(_logits(merged.model, inputs), _logits(reloaded, inputs), atol=1e-5)

    full = train_sft(
        sft_rows(4), cfg_for(tiny, method="full", max_steps=3, learning_rate=1e-3), tmp_path / "full"
    )
    assert full.kind == "full" and full.manifest["kind"] == "full"
    check_model_dir(full.model_dir)
    assert full.metrics.num_rows == 3


def test_the_last_step_is_logged_whatever_logging_steps_is(tmp_path, tiny):
    """3 steps logged every 2: the metrics end at step 3, so the summary counts every step and
    its final loss is the last step's, not step 2's."""
    result = train_sft(sft_rows(4), cfg_for(tiny, max_steps=3, logging_steps=2), tmp_path / "out")
    assert [r["step"] for r in result.metrics.to_pylist()] == [2, 3]
    assert result.manifest["metrics"]["steps"] == 3


def test_train_stage_publishes_model_and_metrics_and_reports_progress(tmp_path, tiny):
    store = Store(tmp_path / "store")
    sft_ref = store.write_table(sft_rows(4), "rewrite", "k1")
    cfg = cfg_for(tiny, max_steps=2)
    steps: list[tuple[int, int]] = []
    out = train.run(store, cfg, sft=sft_ref, work_dir=tmp_path / "work", progress=lambda *a: steps.append(a))
    assert steps == [(1, 2), (2, 2)]  # every optimizer step reaches the stage's progress callback
    ref = out.refs["model"]
    key = train.key(cfg, sft=sft_ref)
    assert out.key == key and list(out.refs) == ["model", "metrics"]
    assert ref.uri == store.uri("train", key, "model") and ref.kind == "lora"
    manifest = store.read_json(f"{ref.uri}/manifest.json")
    assert manifest["data_sha256"] == sft_ref.sha256
    assert "adapter_model.safetensors" in manifest["files"]
    assert store.exists(store.uri("train", key, "metrics.parquet"))
    local = store.get_dir(ref)
    assert (local / "adapter_config.json").exists()
    assert not (tmp_path / "work").exists()  # the work dir is cleaned once published
    # A speed-only field does not change the key; a training field does.
    assert train.key(cfg.model_copy(update={"num_threads": 1}), sft=sft_ref) == key
    assert train.key(cfg.model_copy(update={"learning_rate": 1e-4}), sft=sft_ref) != key


@pytest.mark.slow
def test_smollm2_lora_steps_and_greedy_eval(tmp_path):
    """The real 135M model: a few LoRA steps, then the tuned adapter through the evaluate stage."""
    from glyph_core import evaluate as ev
    from glyph_core.config import EvalConfig

    cfg = cfg_for("smollm2-135m", max_steps=3, batch_size=2, learning_rate=1e-3, max_seq_len=256)
    result = train_sft(sft_rows(6), cfg, tmp_path / "run")
    losses = result.metrics.column("loss").to_pylist()
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] < 6.0  # a real model starts far below the ln(vocab) ≈ 10.8 of a random one
    adapter_cfg = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "smollm2-135m"  # portable across hosts
    problems = pa.Table.from_pylist(
        [
            {
                "id": f"p{i}",
                "source": "gsm8k",
                "split": "test",
                "question": f"What is {i} + {i}?",
                "answer": str(2 * i),
                "difficulty": d,
                "bucket": b,
                "level": None,
            }
            for i, (d, b) in enumerate([(0.0, "easy"), (1.0, "hard")], start=2)
        ]
    )
    out = ev.evaluate(
        problems,
        EvalConfig(max_new_tokens=24),
        tmp_path / "eval",
        base_model="smollm2-135m",
        model=result.model_dir,
    )
    assert out.completions.num_rows == 4
    assert all(t > 0 for t in out.completions.column("completion_tokens").to_pylist())
