from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest
from pydantic import ValidationError

from glyph_core.config import RewriteConfig
from glyph_core.errors import LeakageError
from glyph_core.glyphs import format_trace, has_any_glyph
from glyph_core.prompts import latent_messages
from glyph_core.rewrite import SFT_SCHEMA, key, natural_solution, rewrite
from glyph_core.storage import DatasetRef


def test_natural_solution_per_source() -> None:
    gsm = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert natural_solution("gsm8k", gsm, "18") == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs.\nShe makes 9 * 2 = $18.\nThe answer is 18."
    )
    assert natural_solution("svamp", "( 76.0 - 25.0 )", "51") == "76 - 25 = 51. The answer is 51."
    assert (
        natural_solution("svamp", "( ( 5.0 + 3.0 ) * 2.5 )", "20")
        == "((5 + 3) * 2.5) = 20. The answer is 20."
    )
    assert natural_solution("svamp", "8.0", "8") == "The answer is 8."
    assert natural_solution("math", " $\\boxed{2}$ ", "2") == "$\\boxed{2}$"


def _problems() -> pa.Table:
    rows = []
    for i in range(10):
        rows.append(
            {
                "id": f"h{i}",
                "source": "math",
                "split": "train",
                "question": f"hard {i}",
                "solution": "\\boxed{1}",
                "answer": "1",
                "bucket": "hard",
            }
        )
        rows.append(
            {
                "id": f"e{i}",
                "source": "gsm8k",
                "split": "train",
                "question": f"easy {i}",
                "solution": "x <<1+1=2>>2\n#### 2",
                "answer": "2",
                "bucket": "easy",
            }
        )
    rows.append(
        {
            "id": "m0",
            "source": "svamp",
            "split": "train",
            "question": "mid",
            "solution": "( 1.0 + 1.0 )",
            "answer": "2",
            "bucket": "medium",
        }
    )
    rows.append(
        {
            "id": "t0",
            "source": "math",
            "split": "test",
            "question": "held",
            "solution": "\\boxed{1}",
            "answer": "1",
            "bucket": "hard",
        }
    )
    return pa.Table.from_pylist(rows)


TRACE = format_trace("g", "p", ["s"], "t", "1")


def _kept(ids: list[str]) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "sample": 0, "completion": TRACE} for i in ids])


def test_rows_kinds_ratio_and_prompts() -> None:
    kept = _kept([f"h{i}" for i in range(6)] + ["e0", "m0"])
    natural = pa.Table.from_pylist(
        [
            {"id": "e3", "sample": 0, "completion": "Two. The answer is 2."},
            {"id": "e4", "sample": 0, "completion": TRACE},
        ]
    )
    res = rewrite(
        kept, _problems(), RewriteConfig(glyph_min_bucket="hard", natural_ratio=0.5, seed=1), natural
    )
    t = res.table
    assert t.schema.equals(SFT_SCHEMA)
    assert Counter(t["kind"].to_pylist()) == {"glyph": 6, "natural": 3}
    assert res.stats == {
        "glyph": 6,
        "natural_generated": 1,
        "natural_gold": 2,
        "glyph_below_bucket": 2,
        "natural_with_glyph": 1,
        "glyph_as_natural": 0,
        "natural_short": 0,
    }
    for row in t.to_pylist():
        user, assistant = row["messages"][0], row["messages"][-1]
        q = "hard" if row["kind"] == "glyph" else "easy"
        assert user == latent_messages(f"{q} {row['id'][1:]}")[0]
        assert not has_any_glyph(user["content"])
        assert assistant["role"] == "assistant"
        assert has_any_glyph(assistant["content"]) == (row["kind"] == "glyph")
    by_id = {r["id"]: r for r in t.to_pylist()}
    assert by_id["e3"]["messages"][-1]["content"] == "Two. The answer is 2."  # generation preferred
    assert all("<<" not in r["messages"][-1]["content"] for r in t.to_pylist())


def test_medium_bucket_and_determinism() -> None:
    kept = _kept(["h0", "m0", "e0"])
    cfg = RewriteConfig(glyph_min_bucket="medium", natural_ratio=2.0, seed=3)
    a = rewrite(kept, _problems(), cfg)
    assert Counter(a.table["kind"].to_pylist()) == {"glyph": 2, "natural": 4}
    assert rewrite(kept, _problems(), cfg).table.equals(a.table)
    other = rewrite(kept, _problems(), RewriteConfig(glyph_min_bucket="medium", natural_ratio=2.0, seed=4))
    assert other.table["id"].to_pylist() != a.table["id"].to_pylist()


def test_heldout_problem_is_refused() -> None:
    with pytest.raises(LeakageError, match="t0"):
        rewrite(_kept(["t0"]), _problems(), RewriteConfig())


# ---------------------------------------------------------------------------------------------
# the levers that may teach *when* (RewriteConfig: natural_balance, natural_hard_fraction,
# glyph_min_bucket_by_source)


def _two_sources() -> pa.Table:
    """MATH: 10 hard, 4 easy; GSM8K: 20 easy, 2 hard. Each problem's gold solution is its own
    text, so a natural row can be traced back to the problem it answers."""
    rows = []

    def add(pid: str, source: str, bucket: str) -> None:
        solution = f"sol {pid} \\boxed{{1}}" if source == "math" else f"sol {pid}\n#### 1"
        rows.append(
            {
                "id": pid,
                "source": source,
                "split": "train",
                "question": f"q {pid}",
                "solution": solution,
                "answer": "1",
                "bucket": bucket,
            }
        )

    for i in range(10):
        add(f"mh{i}", "math", "hard")
    for i in range(4):
        add(f"me{i}", "math", "easy")
    for i in range(20):
        add(f"ge{i}", "gsm8k", "easy")
    for i in range(2):
        add(f"gh{i}", "gsm8k", "hard")
    return pa.Table.from_pylist(rows)


def _natural_sources(table: pa.Table) -> Counter[str]:
    return Counter(r["id"][:2] for r in table.to_pylist() if r["kind"] == "natural")


def test_pooled_natural_rows_come_mostly_from_the_source_with_most_easy_problems() -> None:
    kept = _kept([f"mh{i}" for i in range(10)] + ["gh0", "gh1"])
    res = rewrite(kept, _two_sources(), RewriteConfig(glyph_min_bucket="hard", natural_ratio=1.0))
    assert res.stats["glyph"] == 12 and res.stats["natural_gold"] == 12
    drawn = _natural_sources(res.table)
    assert sum(drawn.values()) == 12 and set(drawn) <= {"me", "ge"}
    # 12 of 24 easy problems by id hash: MATH, with 10 of the 12 glyph rows, gets about a sixth.
    assert drawn["ge"] > drawn["me"]


def test_per_source_balance_gives_each_source_natural_rows_for_its_own_glyph_rows() -> None:
    kept = _kept([f"mh{i}" for i in range(10)] + ["gh0", "gh1"])
    cfg = RewriteConfig(glyph_min_bucket="hard", natural_ratio=1.0, natural_balance="per_source")
    res = rewrite(kept, _two_sources(), cfg)
    # MATH: 10 glyph rows want 10 natural rows, only its 4 easy problems exist; GSM8K: 2 for 2.
    assert _natural_sources(res.table) == {"me": 4, "ge": 2}
    assert res.stats["natural_short"] == 6
    for row in res.table.to_pylist():
        if row["kind"] == "natural":  # the problem's own gold solution, made readable
            assert row["messages"][-1]["content"].startswith(f"sol {row['id']}")
    assert rewrite(kept, _two_sources(), cfg).table.equals(res.table)  # deterministic


def test_natural_hard_fraction_answers_a_share_of_hard_problems_naturally() -> None:
    ids = [f"mh{i}" for i in range(10)]
    kept = pa.Table.from_pylist(  # two traces per problem: a switched problem loses both
        [{"id": i, "sample": s, "completion": TRACE} for i in ids for s in (0, 1)]
    )
    cfg = RewriteConfig(glyph_min_bucket="hard", natural_ratio=0.0, natural_hard_fraction=0.3, seed=5)
    res = rewrite(kept, _two_sources(), cfg)
    rows = res.table.to_pylist()
    switched = {r["id"] for r in rows if r["kind"] == "natural"}
    assert len(switched) == 3 and res.stats["glyph_as_natural"] == 3
    assert switched <= set(ids)
    assert not any(r["id"] in switched for r in rows if r["kind"] == "glyph")
    assert res.stats["glyph"] == 14 == sum(r["kind"] == "glyph" for r in rows)
    assert all(not has_any_glyph(r["messages"][-1]["content"]) for r in rows if r["kind"] == "natural")
    other = rewrite(kept, _two_sources(), cfg.model_copy(update={"seed": 6}))
    assert {r["id"] for r in other.table.to_pylist() if r["kind"] == "natural"} != switched
    # natural_ratio counts the glyph rows that remain
    both = rewrite(kept, _two_sources(), cfg.model_copy(update={"natural_ratio": 0.5}))
    assert both.stats["natural_gold"] == 3 + 7


def test_threshold_per_source_overrides_the_global_bucket() -> None:
    kept = _kept(["mh0", "me0", "ge0", "gh0"])
    cfg = RewriteConfig(
        glyph_min_bucket="easy", glyph_min_bucket_by_source={"math": "hard"}, natural_ratio=0.0
    )
    res = rewrite(kept, _two_sources(), cfg)
    assert sorted(r["id"] for r in res.table.to_pylist() if r["kind"] == "glyph") == ["ge0", "gh0", "mh0"]
    assert res.stats["glyph_below_bucket"] == 1  # me0: easy MATH is below MATH's own threshold
    # ... and MATH's easy problems are then the ones that can get natural rows
    res = rewrite(kept, _two_sources(), cfg.model_copy(update={"natural_ratio": 1.0}))
    assert set(_natural_sources(res.table)) == {"me"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("natural_hard_fraction", 1.0),
        ("natural_hard_fraction", -0.1),
        ("natural_ratio", 51),
        ("natural_balance", "by_source"),
        ("glyph_min_bucket_by_source", {"aime": "hard"}),
        ("glyph_min_bucket_by_source", {"math": "hardest"}),
    ],
)
def test_lever_ranges_are_enforced(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        RewriteConfig.model_validate({field: value})


def test_every_lever_is_in_the_cache_key() -> None:
    refs = {
        "kept": DatasetRef(uri="k", sha256="a" * 64, rows=1),
        "problems": DatasetRef(uri="p", sha256="b" * 64, rows=1),
    }
    base = RewriteConfig()
    keys = {key(base, **refs)}
    for update in (
        {"glyph_min_bucket": "medium"},
        {"glyph_min_bucket_by_source": {"math": "medium"}},
        {"natural_ratio": 1.0},
        {"natural_balance": "per_source"},
        {"natural_hard_fraction": 0.2},
        {"seed": 1},
    ):
        keys.add(key(RewriteConfig.model_validate({**base.model_dump(), **update}), **refs))
    assert len(keys) == 7
