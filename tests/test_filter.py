from __future__ import annotations

import pyarrow as pa
import pytest

import glyph_core.filter as filt
from glyph_core.config import FilterConfig
from glyph_core.errors import LeakageError, SchemaError
from glyph_core.filter import CHECK_ORDER, filter_traces
from glyph_core.glyphs import format_trace

PROBLEMS = pa.Table.from_pylist(
    [
        {"id": "p1", "split": "train", "answer": "18"},
        {"id": "p2", "split": "train", "answer": "\\frac{\\sqrt{3}}{2}"},
        {"id": "h1", "split": "test", "answer": "1"},
    ]
)


def good(final: str, step: str = "work") -> str:
    return format_trace("rule", "plan", [step], "so", final)


def traces(rows: list[tuple]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "id": i,
                "sample": s,
                "prompt": "p",
                "completion": c,
                "finish_reason": f,
                "prompt_tokens": 5,
                "completion_tokens": n,
                "teacher": "t",
            }
            for i, s, c, f, n in rows
        ]
    )


CASES = traces(
    [
        ("p1", 0, good("$18.00"), "stop", 10),  # kept
        ("p1", 1, good("18"), "length", 10),  # truncated (also would be fine otherwise)
        ("p1", 2, good("18"), "stop", 5000),  # too_long
        ("p1", 3, good("18").replace("\U0001f706", ""), "stop", 10),  # bad_structure (no plan)
        ("p1", 4, good("17"), "stop", 10),  # wrong_answer
        ("p1", 5, good("$18.00").replace("\n", "\n "), "stop", 10),  # duplicate of sample 0 after whitespace
        ("p2", 0, good("\\boxed{\\frac{\\sqrt3}{2}}"), "stop", 10),  # kept, via math-verify
        ("p2", 1, good("0.8660"), "stop", 10),  # wrong_answer (too coarse)
        ("p2", 2, good("18", step="other") + "\n\U0001f75e 5", "length", 9999),  # truncated wins over all
    ]
)


def test_each_reason_once_in_check_order() -> None:
    res = filter_traces(CASES, PROBLEMS, FilterConfig(max_completion_tokens=1024, workers=1))
    assert res.drops["reason"].to_pylist() == list(CHECK_ORDER)
    assert res.drop_counts() == {
        "truncated": 2,
        "too_long": 1,
        "bad_structure": 1,
        "wrong_answer": 2,
        "duplicate": 1,
    }
    kept = list(zip(res.kept["id"].to_pylist(), res.kept["sample"].to_pylist(), strict=True))
    assert kept == [("p1", 0), ("p2", 0)]
    assert res.kept.schema == CASES.schema


def test_every_reason_listed_even_when_zero() -> None:
    res = filter_traces(CASES.slice(0, 1), PROBLEMS, FilterConfig(workers=1))
    assert res.drop_counts() == dict.fromkeys(CHECK_ORDER, 0)
    assert res.kept.num_rows == 1


def test_natural_traces_skip_structure() -> None:
    t = traces([("p1", 0, "She makes 9 * 2 = $18.\nThe answer is 18.", "stop", 10)])
    assert filter_traces(t, PROBLEMS, FilterConfig(workers=1)).drop_counts()["bad_structure"] == 1
    res = filter_traces(t, PROBLEMS, FilterConfig(workers=1, require_structure=False))
    assert res.kept.num_rows == 1


def test_unknown_and_heldout_ids() -> None:
    with pytest.raises(SchemaError, match="nope"):
        filter_traces(traces([("nope", 0, good("1"), "stop", 1)]), PROBLEMS, FilterConfig(workers=1))
    with pytest.raises(LeakageError, match="h1"):
        filter_traces(traces([("h1", 0, good("1"), "stop", 1)]), PROBLEMS, FilterConfig(workers=1))
    with pytest.raises(SchemaError, match="completion_tokens"):
        filter_traces(CASES.drop_columns(["completion_tokens"]), PROBLEMS, FilterConfig(workers=1))


def test_process_pool_matches_serial(monkeypatch: pytest.MonkeyPatch) -> None:
    big = pa.concat_tables([CASES] * 40)
    big = big.set_column(1, "sample", pa.array(range(big.num_rows)))
    serial = filter_traces(big, PROBLEMS, FilterConfig(workers=1))
    monkeypatch.setattr(filt, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(filt, "CHUNK_ROWS", 50)
    seen: list[int] = []
    pooled = filter_traces(big, PROBLEMS, FilterConfig(workers=2), progress=seen.append)
    assert pooled.drops.equals(serial.drops)
    assert pooled.kept.equals(serial.kept)
    assert sum(seen) == big.num_rows and seen[0] == 40 * 3  # truncated/too_long never reach the workers
