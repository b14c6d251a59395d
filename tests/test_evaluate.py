"""The evaluate stage: scoring, stratified sampling, aggregation, and base vs tuned end to end with
a tiny random model (its completions are noise; the plumbing, files and caching are what is
tested). The statistics themselves are tested in test_metrics.py, the rendering in
test_eval_report.py."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glyph_core import evaluate as ev
from glyph_core.config import EvalConfig, LoraConfig, TrainConfig
from glyph_core.errors import GlyphError
from glyph_core.evaluate import check_tuned_model, sample_heldout, score_completion, stratum_of
from glyph_core.metrics import aggregate, selectivity, wilson
from glyph_core.storage import ModelRef, Store
from glyph_core.teachers.base import Completion

G, P, S, T, F = "\U0001f71e", "\U0001f706", "\U0001f702", "\U0001f703", "\U0001f75e"
VALID = f"{G} add things\n{P} sum them\n{S} 2 + 3 = 5\n{T} the sum is 5\n{F} 5"


# -- scoring --------------------------------------------------------------------------------------


def test_score_full_valid_trace():
    s = score_completion(VALID, "5")
    assert s["emerged"] and s["valid"] and not s["partial"] and s["correct"]
    assert s["glyph_kinds"] == 5 and s["violations"] == [] and s["pred"] == "5"


def test_score_partial_glyphs_are_emerged_but_not_valid():
    s = score_completion(f"Adding gives five.\n{F} 5", "5")
    assert s["emerged"] and s["partial"] and not s["valid"] and s["correct"]
    assert s["glyph_kinds"] == 1 and "missing_glyph" in s["violations"]
    wrong_order = score_completion(f"{P} plan\n{G} rule\n{S} step\n{T} so\n{F} 5", "5")
    assert wrong_order["partial"] and "wrong_order" in wrong_order["violations"]


def test_score_natural_answers():
    s = score_completion("2 + 3 = 5, so the answer is $\\frac{10}{2}$.", "5")
    assert not s["emerged"] and not s["valid"] and not s["partial"] and s["correct"]
    assert s["violations"] == []
    assert not score_completion("The answer is 6.", "5")["correct"]
    assert not score_completion("", "5")["correct"]


def test_score_truncated_completion_without_a_marker_has_no_prediction():
    cut = "We need n mod 7. Trying n = 12 gives 12 mod 7 = 5, and the next index 5 gives"
    assert score_completion(cut, "5")["correct"]  # the last-number fallback: right by accident
    s = score_completion(cut, "5", finish_reason="length")
    assert s["truncated"] and s["pred"] is None and not s["correct"]
    marked = score_completion("So the answer is \\boxed{5}. To double-check, 12 mod", "5", "length")
    assert marked["truncated"] and marked["pred"] == "5" and marked["correct"]
    assert not score_completion(cut, "5", finish_reason="stop")["truncated"]


def test_score_cut_final_section_is_neither_valid_nor_answered():
    s = score_completion(VALID.replace(f"{F} 5", f"{F} \\boxed{{\\frac{{10}}{{"), "5", "length")
    assert s["emerged"] and not s["valid"] and s["violations"] == ["no_final_answer"]
    assert s["pred"] is None and not s["correct"]


# -- selection and aggregation --------------------------------------------------------------------


LEVELS = {("math", "easy"): 1, ("math", "medium"): 3, ("math", "hard"): 5}
LEVELS |= {("gsm8k", "easy"): 2, ("gsm8k", "medium"): 4, ("gsm8k", "hard"): 7}
STRATA = {"math/level=1", "math/level=3", "math/level=5", "gsm8k/steps<=2", "gsm8k/steps=4", "gsm8k/steps>=6"}


def problems_table() -> pa.Table:
    rows = []
    diffs = {"easy": 0.0, "medium": 0.5, "hard": 1.0}
    for source in ("gsm8k", "math"):
        for bucket, d in diffs.items():
            for i in range(3):
                for split in ("train", "test"):
                    a = 2 * i + 1
                    rows.append(
                        {
                            "id": f"{source}/{split}/{bucket}/{i}",
                            "source": source,
                            "split": split,
                            "question": f"What is {i} + {i + 1}?",
                            "solution": f"{i} + {i + 1} = {a}",
                            "answer": str(a),
                            "difficulty": d,
                            "bucket": bucket,
                            "level": LEVELS[(source, bucket)],
                            "type": None,
                            "math500": False,
                        }
                    )
    return pa.Table.from_pylist(rows)


def test_strata_are_source_and_its_own_level():
    assert [stratum_of("math", lv) for lv in (1, 5)] == ["math/level=1", "math/level=5"]
    assert [stratum_of("gsm8k", n) for n in (1, 2, 3, 5, 6, 11)] == [
        "gsm8k/steps<=2",
        "gsm8k/steps<=2",
        "gsm8k/steps=3",
        "gsm8k/steps=5",
        "gsm8k/steps>=6",
        "gsm8k/steps>=6",
    ]
    assert [stratum_of("svamp", n) for n in (1, 2, 4)] == ["svamp/ops=1", "svamp/ops=2", "svamp/ops>=3"]
    assert stratum_of("math", None) == "math/level=?"


def test_sample_heldout_per_stratum_and_deterministic():
    t = problems_table()
    all_test = sample_heldout(t, EvalConfig())
    assert all_test.num_rows == 18 and set(all_test.column("split").to_pylist()) == {"test"}
    one = sample_heldout(t, EvalConfig(per_stratum=1))
    assert one.num_rows == 6  # 2 sources x 3 levels
    assert (
        one.column("id").to_pylist() == sample_heldout(t, EvalConfig(per_stratum=1)).column("id").to_pylist()
    )
    assert (
        one.column("id").to_pylist()
        == sample_heldout(t.take(list(range(t.num_rows))[::-1]), EvalConfig(per_stratum=1))
        .column("id")
        .to_pylist()
    )
    assert {stratum_of(r["source"], r["level"]) for r in one.to_pylist()} == STRATA
    two = sample_heldout(t, EvalConfig(per_stratum=2))
    assert two.num_rows == 12 and set(one.column("id").to_pylist()) <= set(two.column("id").to_pylist())
    other_seed = sample_heldout(t, EvalConfig(per_stratum=1, seed=7)).column("id").to_pylist()
    assert len(other_seed) == 6


def test_per_bucket_is_gone():
    """The old setting is an unknown key now, not silently ignored."""
    with pytest.raises(ValueError, match="per_bucket"):
        EvalConfig(per_bucket=3)  # type: ignore[call-arg]


def test_empty_evaluation_set_is_an_error():
    train_only = problems_table().filter(pa.compute.equal(problems_table()["split"], "train"))
    with pytest.raises(GlyphError, match="empty evaluation set"):
        sample_heldout(train_only, EvalConfig())
    with pytest.raises(GlyphError, match="lacks columns"):
        sample_heldout(pa.table({"id": ["a"]}), EvalConfig())


def _fake_scored() -> pa.Table:
    """Tuned: glyphs on every hard problem, none on easy; the medium GSM8K ones are cut at the
    token limit mid-reasoning. Base: never glyphs."""
    rows = [r for r in problems_table().to_pylist() if r["split"] == "test"]

    def tuned(r: dict) -> Completion:
        if r["bucket"] == "hard":
            return Completion(VALID, "stop", 10, 20)
        if r["bucket"] == "medium" and r["source"] == "gsm8k":
            return Completion("First 2 + 3 = 5 and then", "length", 10, 32)
        return Completion("It is 5.", "stop", 10, 20)

    comps_base = [Completion("I think 5.", "stop", 10, 4) for r in rows]
    return pa.concat_tables(
        [ev.score_rows(rows, comps_base, "base"), ev.score_rows(rows, [tuned(r) for r in rows], "tuned")]
    )


def test_aggregate_and_selectivity():
    scored = _fake_scored()
    assert scored.column("truncated").to_pylist().count(True) == 3
    assert set(scored.column("stratum").to_pylist()) == STRATA
    table = aggregate(scored)
    by = {(r["model"], r["group_by"], r["group"]): r for r in table.to_pylist()}
    assert by[("tuned", "bucket", "hard")]["emergence"] == 1.0
    assert by[("tuned", "bucket", "easy")]["emergence"] == 0.0
    assert by[("tuned", "all", "all")]["n"] == 18
    assert by[("tuned", "source", "math")]["n"] == 9
    assert by[("tuned", "source_bucket", "math/hard")]["valid"] == 1.0
    assert by[("tuned", "stratum", "math/level=5")]["n"] == 3
    assert by[("base", "bucket", "hard")]["emergence"] == 0.0
    assert by[("base", "all", "all")]["mean_tokens"] == 4.0
    # truncation: the 3 medium GSM8K completions of the tuned model, i.e. 3 of 6 medium ones
    assert by[("tuned", "bucket", "medium")]["truncated"] == 0.5
    assert by[("tuned", "source", "gsm8k")]["truncated"] == pytest.approx(1 / 3)
    assert by[("base", "all", "all")]["truncated"] == 0.0
    # answers are "5"; golds are 1, 3, 5 → one in three correct for base; the tuned model's
    # truncated "... 2 + 3 = 5 and then" would be right on gold 5 by the last-number fallback
    assert by[("base", "all", "all")]["accuracy"] == pytest.approx(1 / 3)
    assert by[("tuned", "source_bucket", "gsm8k/medium")]["accuracy"] == 0.0
    lo, hi = wilson(6, 18)
    assert by[("base", "all", "all")]["accuracy_lo"] == pytest.approx(lo)
    assert by[("base", "all", "all")]["accuracy_hi"] == pytest.approx(hi)

    sel = selectivity(scored, resamples=200)
    tuned, base = sel["models"]["tuned"], sel["models"]["base"]
    assert tuned["emergence_hard_minus_easy"] == 1.0 == tuned["pooled"]["hard_minus_easy"]["value"]
    assert tuned["auroc_glyph_vs_difficulty"] == 1.0
    assert tuned["within_source"]["auroc"]["value"] == 1.0
    assert tuned["within_source"]["by_source"]["math"]["auroc"]["n_glyph"] == 3
    assert base["auroc_glyph_vs_difficulty"] is None  # never uses glyphs: undefined
    assert base["within_source"]["auroc"]["value"] is None
    metrics = ev.build_metrics(scored, table, {"config": {"max_new_tokens": 32}}, version=ev.VERSION)
    assert metrics["tuned_minus_base"]["hard"]["emergence"] == 1.0
    assert metrics["tuned_minus_base"]["medium"]["truncated"] == 0.5
    assert metrics["warnings"] == [
        "tuned: completions hit the token limit (bucket medium 50% of 6; source gsm8k 33% of 9); "
        "evaluate.max_new_tokens (32) is probably too small",
    ]
    json.dumps(metrics, allow_nan=False)  # NaNs became nulls


# -- models ---------------------------------------------------------------------------------------


def _sft_rows() -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "id": f"r{i}",
                "kind": "glyph",
                "messages": [
                    {"role": "user", "content": f"What is {i} + 1?"},
                    {"role": "assistant", "content": VALID},
                ],
            }
            for i in range(4)
        ]
    )


@pytest.fixture(scope="module")
def tiny() -> str:
    from glyph_core.models import tiny_model_dir

    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny) -> tuple[Store, ModelRef]:
    from glyph_core import train

    root = tmp_path_factory.mktemp("evalstore")
    store = Store(root)
    ref = store.write_table(_sft_rows(), "rewrite", "x")
    cfg = TrainConfig(
        base_model=tiny, max_steps=2, batch_size=2, grad_accum=1, lora=LoraConfig(r=4, alpha=8), num_threads=2
    )
    return store, train.run(store, cfg, sft=ref, work_dir=root / "work").refs["model"]


def test_adapter_for_another_base_is_rejected(tmp_path, trained, tiny):
    from glyph_core.models import tiny_model_dir

    store, ref = trained
    adapter = store.get_dir(ref)
    assert check_tuned_model(adapter, tiny) == adapter
    other = str(tiny_model_dir("qwen2"))
    with pytest.raises(GlyphError, match="not on the configured base model"):
        check_tuned_model(adapter, other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GlyphError, match="no config.json"):
        check_tuned_model(empty, tiny)


def test_bad_input_fails_before_any_model_loads(tmp_path, monkeypatch, trained, tiny):
    from glyph_core.models import tiny_model_dir

    def boom(*a, **k):
        raise AssertionError("generation started before input checks")

    monkeypatch.setattr(ev, "generate_completions", boom)
    store, ref = trained
    train_only = problems_table().filter(pa.compute.equal(problems_table()["split"], "train"))
    with pytest.raises(GlyphError, match="empty evaluation set"):
        ev.evaluate(train_only, EvalConfig(), tmp_path, base_model=tiny, model=store.get_dir(ref))
    with pytest.raises(GlyphError, match="configured base"):
        ev.evaluate(
            problems_table(),
            EvalConfig(),
            tmp_path,
            base_model=str(tiny_model_dir("qwen2")),
            model=store.get_dir(ref),
        )
    empty_ref = store.write_table(train_only, "unify", "t")
    with pytest.raises(GlyphError, match="empty evaluation set"):
        ev.evaluate_refs(store, empty_ref, ref, EvalConfig())


def test_base_vs_tuned_end_to_end(tmp_path, trained, tiny):
    store, ref = trained
    cfg = EvalConfig(per_stratum=1, max_new_tokens=6, batch_size=8)
    result = ev.evaluate(problems_table(), cfg, tmp_path / "out", base_model=tiny, model=store.get_dir(ref))
    comp = result.completions
    assert comp.num_rows == 12
    base_ids = [r["id"] for r in comp.to_pylist() if r["model"] == "base"]
    tuned_ids = [r["id"] for r in comp.to_pylist() if r["model"] == "tuned"]
    assert base_ids == tuned_ids and len(base_ids) == 6  # the same problems, side by side
    assert all(0 < t <= 6 for t in comp.column("completion_tokens").to_pylist())
    assert set(result.metrics["models"]) == {"base", "tuned"}
    for name in ("completions", "table", "table_md", "metrics", "plot"):
        assert Path(result.paths[name]).is_file(), name
    assert Path(result.paths["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert pq.read_table(result.paths["completions"]).num_rows == 12
    metrics = json.loads(Path(result.paths["metrics"]).read_text())
    assert metrics["n_problems"] == 6 and "tuned_minus_base" in metrics
    reasons = comp.column("finish_reason").to_pylist()
    assert comp.column("truncated").to_pylist() == [r == "length" for r in reasons]
    high = [
        (m, b)
        for m, mm in metrics["models"].items()
        for b, st in mm["by_bucket"].items()
        if st["truncated"] > 0.2
    ]
    assert sum(w.count("bucket ") for w in metrics["warnings"]) == len(high)
    report_md = Path(result.paths["table_md"]).read_text()
    assert all(w in report_md for w in metrics["warnings"])


def test_run_evaluate_caches_the_base_model_apart(monkeypatch, trained, tiny):
    store, ref = trained
    problems_ref = store.write_table(problems_table(), "unify", "p")
    cfg = EvalConfig(per_stratum=1, max_new_tokens=4)
    calls: list[str] = []
    real = ev.generate_completions

    def counting(problems, model, label, cfg, models=None):
        calls.append(label)
        return real(problems, model, label, cfg, models)

    monkeypatch.setattr(ev, "generate_completions", counting)
    first = ev.evaluate_refs(store, problems_ref, ref, cfg)
    assert calls == ["base", "tuned"]
    assert first.paths["plot"].endswith("emergence_accuracy.png") and store.exists(first.paths["plot"])
    assert store.exists(first.paths["metrics"])

    calls.clear()
    again = ev.evaluate_refs(store, problems_ref, ref, cfg.model_copy(update={"batch_size": 2}))
    assert calls == []  # same key (batch_size is not in it): everything cached
    assert again.completions.equals(first.completions)

    # A re-trained model reuses the base completions and generates only its own.
    from glyph_core import train

    manifest = store.read_json(f"{ref.uri}/manifest.json")
    sft_ref = store.write_table(_sft_rows(), "rewrite", "y")
    cfg2 = TrainConfig(**{**manifest["config"], "seed": 1})
    retrained = train.run(store, cfg2, sft=sft_ref).refs["model"]
    assert retrained.sha256 != ref.sha256
    calls.clear()
    ev.evaluate_refs(store, problems_ref, retrained, cfg)
    assert calls == ["tuned"]
    calls.clear()
    ev.evaluate_refs(store, problems_ref, ref, cfg.model_copy(update={"max_new_tokens": 3}))
    assert calls == ["base", "tuned"]  # a config change that alters outputs recomputes both


def test_cli_train_then_evaluate(tmp_path, tiny):
    """`glyph train` and `glyph evaluate` on files, end to end with the tiny model."""
    from typer.testing import CliRunner

    from glyph_cli.main import app

    sft = tmp_path / "sft.parquet"
    pq.write_table(_sft_rows(), sft)
    problems = tmp_path / "problems.parquet"
    pq.write_table(problems_table(), problems)
    runner = CliRunner(env={"COLUMNS": "200"})
    store = ["--store", str(tmp_path / "store")]
    res = runner.invoke(
        app,
        ["train", "--sft", str(sft), "-o", str(tmp_path / "run"), "--base-model", tiny, "--max-steps", "2",
         "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4", "--num-threads", "2", *store],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "adapter_config.json").exists()
    res = runner.invoke(
        app,
        ["evaluate", "--problems", str(problems), "--model", str(model_dir), "--per-stratum", "1",
         "--max-new-tokens", "4", "-o", str(tmp_path / "eval"), *store],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "eval" / "table.parquet").is_file() and (
        tmp_path / "eval" / "completions.parquet"
    ).is_file()
    (key_dir,) = (tmp_path / "store" / "evaluate").glob("*/emergence_accuracy.png")
    report_md = (key_dir.parent / "table.md").read_text()
    assert report_md.startswith("## Promptless evaluation: base vs tuned")
    assert "### Selectivity within each source (headline)" in report_md
    assert "| all | tuned | 6 |" in report_md  # --per-stratum 1 is one problem per stratum: 6
    assert "Promptless evaluation" in res.output

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "x", "messages": [{"role": "user", "content": "q"}]}]), bad)
    res = runner.invoke(
        app, ["train", "--sft", str(bad), "-o", str(tmp_path / "r2"), "--base-model", tiny, *store]
    )
    assert res.exit_code == 1 and "no assistant turn" in res.output
