from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from glyph_core.config import UnifyConfig
from glyph_core.errors import LeakageError, SourceError
from glyph_core.sources import load_hub, load_local, load_source
from glyph_core.unify import (
    PROBLEMS_SCHEMA,
    bucket,
    check_leakage,
    difficulty,
    svamp_holdout_ids,
    unify,
    unify_records,
)

# ---------------------------------------------------------------------------------------------
# real data


def test_real_source_counts(data_dir: Path) -> None:
    gsm = Counter(r["split"] for r in load_source("gsm8k", data_dir))
    assert gsm == {"train": 7473, "test": 1319}
    assert len(load_source("svamp", data_dir)) == 1000
    math = load_source("math", data_dir)
    assert Counter(r["split"] for r in math) == {"train": 7500, "test": 5000}
    assert sum(r["math500"] for r in math) == 500
    assert all(r["split"] == "test" for r in math if r["math500"])
    ids = {r["id"] for r in math}
    assert {"math/test/algebra/1", "math/train/geometry/377"} <= ids


@pytest.fixture(scope="module")
def problems(data_dir: Path) -> pa.Table:
    return unify(UnifyConfig(), data_dir).table


def test_unify_real(problems: pa.Table) -> None:
    t = problems
    assert t.schema.equals(PROBLEMS_SCHEMA)
    assert len(set(t["id"].to_pylist())) == t.num_rows
    c = Counter(zip(t["source"].to_pylist(), t["split"].to_pylist(), strict=True))
    assert c[("svamp", "test")] == 300 and c[("svamp", "train")] == 700
    assert c[("gsm8k", "test")] == 1319 and c[("gsm8k", "train")] == 7473
    assert c[("math", "test")] == 4999  # one near-duplicate pair inside MATH test
    assert 7490 <= c[("math", "train")] <= 7496  # 4 in-train dups, 4 overlaps with test, 2 without answer
    assert pc.sum(t["math500"]).as_py() == 500  # MATH-500 rows are never the dropped duplicate
    assert "math/train/number_theory/7115" not in set(t["id"].to_pylist())  # empty \boxed{}
    d = t["difficulty"].to_pylist()
    assert min(d) >= 0 and max(d) <= 1
    assert [bucket(x) for x in d] == t["bucket"].to_pylist()
    check_leakage(t)


def test_svamp_holdout_is_deterministic_and_order_free() -> None:
    ids = [f"svamp/chal-{i}" for i in range(1, 1001)]
    a = svamp_holdout_ids(ids, 300)
    assert len(a) == 300
    assert a == svamp_holdout_ids(list(reversed(ids)), 300)
    assert svamp_holdout_ids(ids[:500], 300) != a  # depends on ids only, not on position


@pytest.mark.parametrize(
    ("source", "level", "expected"),
    [
        ("math", 1, "easy"),
        ("math", 2, "easy"),
        ("math", 3, "medium"),
        ("math", 4, "hard"),
        ("math", 5, "hard"),
        ("math", None, "medium"),
        ("gsm8k", 2, "easy"),
        ("gsm8k", 3, "easy"),
        ("gsm8k", 4, "medium"),
        ("gsm8k", 5, "medium"),
        ("gsm8k", 6, "hard"),
        ("gsm8k", 11, "hard"),
        ("svamp", 0, "easy"),
        ("svamp", 1, "easy"),
        ("svamp", 2, "medium"),
        ("svamp", 3, "hard"),
    ],
)
def test_bucket_rule_table(source: str, level: int | None, expected: str) -> None:
    assert bucket(difficulty(source, level)) == expected


def _rec(i: str, split: str | None, q: str, source: str = "gsm8k", **kw) -> dict:
    base = {
        "id": i,
        "source": source,
        "split": split,
        "question": q,
        "solution": "s",
        "answer": "1",
        "level": 2,
        "type": None,
        "math500": False,
    }
    return {**base, **kw}


def test_dedup_rules() -> None:
    recs = [
        _rec("gsm8k/train/0", "train", "How many apples?"),
        _rec("gsm8k/train/1", "train", "how many  APPLES"),  # duplicate within train: dropped
        _rec("gsm8k/train/2", "train", "What is 2 + 3?"),  # same as a test question: leaves train
        _rec("gsm8k/train/3", "train", "What is 2 - 3?"),  # operators differ: kept
        _rec("gsm8k/test/0", "test", "What is 2+3 ?"),
        _rec("gsm8k/train/4", "train", "No gold", answer=None),
    ]
    res = unify_records(recs, UnifyConfig(sources=["gsm8k"], svamp_holdout=0))
    assert res.table["id"].to_pylist() == ["gsm8k/train/0", "gsm8k/train/3", "gsm8k/test/0"]
    assert res.dropped == {"duplicate_in_split": 1, "overlaps_heldout": 1, "no_answer": 1, "subsampled": 0}


def test_leakage_check_catches_injected_leak(problems: pa.Table) -> None:
    test_q = problems.filter(pc.equal(problems["split"], "test"))["question"][0].as_py()
    leak = pa.Table.from_pylist(
        [
            {
                **problems.slice(0, 1).to_pylist()[0],
                "id": "injected/1",
                "split": "train",
                "question": "  " + test_q.upper() + " ",
            }
        ],
        schema=problems.schema,
    )
    with pytest.raises(LeakageError, match="injected/1"):
        check_leakage(pa.concat_tables([problems, leak]))


def test_subsample_keeps_math500_first(tiny_data_dir: Path) -> None:
    res = unify(UnifyConfig(max_train_per_source=5, max_test_per_source=3, svamp_holdout=10), tiny_data_dir)
    c = Counter(zip(res.table["source"].to_pylist(), res.table["split"].to_pylist(), strict=True))
    assert all(n == (5 if split == "train" else 3) for (_, split), n in c.items())
    assert res.dropped["subsampled"] > 0
    again = unify(UnifyConfig(max_train_per_source=5, max_test_per_source=3, svamp_holdout=10), tiny_data_dir)
    assert again.table.equals(res.table)


# ---------------------------------------------------------------------------------------------
# bad input: the error names file, line/row and field


def _gsm_dir(tmp_path: Path, train: str) -> Path:
    (tmp_path / "gsm8k").mkdir(parents=True)
    (tmp_path / "gsm8k" / "train.jsonl").write_text(train, encoding="utf-8")
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "a\\n#### 1"}\n')
    return tmp_path


GOOD = '{"question": "q", "answer": "a\\n#### 1"}\n'


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (GOOD + '{"question": "q"}\n', ["train.jsonl", "line 2", "'answer'", "missing field"]),
        (GOOD + GOOD + "{not json\n", ["train.jsonl", "line 3", "not valid JSON"]),
        ("", ["train.jsonl", "empty file"]),
        ("\n\n", ["train.jsonl", "empty file"]),
        (
            GOOD + '{"question": 5, "answer": "a #### 1"}\n',
            ["train.jsonl", "line 2", "'question'", "wrong type"],
        ),
        ('["q", "a"]\n', ["train.jsonl", "line 1", "wrong type"]),
        (GOOD + '{"question": "q", "answer": "no marker"}\n', ["train.jsonl", "line 2", "'answer'", "####"]),
    ],
)
def test_bad_gsm8k_input(tmp_path: Path, content: str, needles: list[str]) -> None:
    root = _gsm_dir(tmp_path, content)
    with pytest.raises(SourceError) as exc:
        load_local("gsm8k", root)
    for needle in needles:
        assert needle in str(exc.value)


def test_bad_svamp_and_math_input(tmp_path: Path) -> None:
    (tmp_path / "svamp").mkdir()
    rows = [
        {
            "ID": "chal-1",
            "Body": "b",
            "Question": "q",
            "Equation": "( 1.0 + 2.0 )",
            "Answer": 3.0,
            "Type": "Addition",
        },
        {"ID": "chal-2", "Body": "b", "Question": "q", "Equation": "e", "Answer": "3", "Type": "Addition"},
    ]
    (tmp_path / "svamp" / "SVAMP.json").write_text(json.dumps(rows))
    with pytest.raises(SourceError, match=r"SVAMP\.json, row 1, field 'Answer': wrong type"):
        load_local("svamp", tmp_path)
    (tmp_path / "svamp" / "SVAMP.json").write_text('{"ID": 1}')
    with pytest.raises(SourceError, match=r"SVAMP\.json.*expected a JSON list"):
        load_local("svamp", tmp_path)
    (tmp_path / "svamp" / "SVAMP.json").write_text('[\n{"ID": 1,\n')
    with pytest.raises(SourceError, match=r"SVAMP\.json, line \d+: not valid JSON"):
        load_local("svamp", tmp_path)

    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "math500_test.jsonl").write_text('{"unique_id": "test/algebra/1.json"}\n')
    ok = {
        "problem": "p",
        "level": "Level 2",
        "type": "Algebra",
        "solution": "\\boxed{1}",
        "unique_id": "train/algebra/1.json",
    }
    (tmp_path / "math" / "train.jsonl").write_text(
        json.dumps(ok) + "\n" + json.dumps({**ok, "level": "hard"})
    )
    (tmp_path / "math" / "test.jsonl").write_text(json.dumps({**ok, "unique_id": "test/algebra/1.json"}))
    with pytest.raises(SourceError, match=r"train\.jsonl, line 2, field 'level'"):
        load_local("math", tmp_path)
    (tmp_path / "math" / "train.jsonl").write_text(
        json.dumps({k: v for k, v in ok.items() if k != "unique_id"})
    )
    with pytest.raises(SourceError, match=r"train\.jsonl, line 1, field 'unique_id': missing field"):
        load_local("math", tmp_path)
    (tmp_path / "math" / "train.jsonl").unlink()
    with pytest.raises(SourceError, match=r"train\.jsonl: file not found"):
        load_local("math", tmp_path)


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown source 'aime'"):
        load_source("aime", tmp_path)
    with pytest.raises(SourceError, match="data directory not found"):
        load_local("gsm8k", tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# Hub path, with a fake datasets.load_dataset (no network in CI)


def test_hub_path_with_fake_loader() -> None:
    calls = []

    def fake(hub_id, config, split, revision):
        calls.append((hub_id, config, split, revision))
        if hub_id == "openai/gsm8k":
            return [{"question": f"{split} q{i}", "answer": f"s\n#### {i}"} for i in range(3)]
        if hub_id == "HuggingFaceH4/MATH-500":
            return [{"problem": "P500", "unique_id": "test/algebra/7.json"}]
        if hub_id == "EleutherAI/hendrycks_math":
            prob = "P500" if (config, split) == ("algebra", "test") else f"{config} {split}"
            return [{"problem": prob, "level": "Level 3", "type": "Algebra", "solution": "\\boxed{2}"}]
        return (
            [
                {
                    "ID": "chal-1",
                    "Body": "b",
                    "Question": "q",
                    "Equation": "( 1.0 + 2.0 )",
                    "Answer": 3.0,
                    "Type": "Addition",
                }
            ]
            if split == "train"
            else []
        )

    gsm = load_hub("gsm8k", {"gsm8k": "abc123"}, load=fake)
    assert [r["id"] for r in gsm][:2] == ["gsm8k/train/0", "gsm8k/train/1"] and len(gsm) == 6
    assert ("openai/gsm8k", "main", "train", "abc123") in calls
    math = load_hub("math", load=fake)
    assert {r["id"] for r in math if r["math500"]} == {"math/test/algebra/7"}
    assert "math/train/geometry/hf-0" in {r["id"] for r in math}
    with pytest.raises(SourceError, match=r"hf://ChilleD/SVAMP.*test.*empty split"):
        load_hub("svamp", load=fake)
