from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from glyph_core.config import RewriteConfig
from glyph_core.errors import LeakageError
from glyph_core.glyphs import format_trace, has_any_glyph
from glyph_core.prompts import latent_messages
from glyph_core.rewrite import SFT_SCHEMA, natural_solution, rewrite


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
