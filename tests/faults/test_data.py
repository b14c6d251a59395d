"""Bad data files get one `SourceError` line naming the file, the line (or row) and the field.

Files are written in the upstream layout of the real data (`tiny_data_dir`: the first rows of
each real file) and then damaged the way files get damaged: a binary or compressed file under
the expected name, a download cut off mid-record, an empty file, a record without a field.

Before: binary garbage raised a raw `UnicodeDecodeError` that named no file, and a source list
that left no training (or no held-out) problems went through unify and failed stages later.
The truncated/empty/missing-field cases already gave a located `SourceError`; they stay here as
guards of that contract for every file of the layout.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from glyph_core.config import UnifyConfig
from glyph_core.errors import GlyphError, SourceError
from glyph_core.unify import unify

FILES = {  # source -> the files of its layout, relative to the data directory
    "gsm8k": ["gsm8k/train.jsonl", "gsm8k/test.jsonl"],
    "svamp": ["svamp/SVAMP.json"],
    "math": ["math/train.jsonl", "math/test.jsonl", "math/math500_test.jsonl"],
}
CASES = [(source, rel) for source, rels in FILES.items() for rel in rels]


@pytest.fixture
def tiny_data_dir(tiny_data_dir: Path) -> Path:
    """The shared fixture, with SVAMP.json indented one record field per line as upstream."""
    svamp = tiny_data_dir / "svamp" / "SVAMP.json"
    svamp.write_text(json.dumps(json.loads(svamp.read_text()), indent=4), encoding="utf-8")
    return tiny_data_dir


def _unify_error(root: Path, source: str) -> str:
    with pytest.raises(SourceError) as exc:
        unify(UnifyConfig(sources=[source]), root)
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("source", "rel"), CASES)
def test_binary_garbage_names_the_file_and_line(tiny_data_dir: Path, source: str, rel: str) -> None:
    path = tiny_data_dir / rel
    lines = path.read_bytes().splitlines(keepends=True)
    # a valid first line (for a JSON list: its opening), then bytes that are not UTF-8
    path.write_bytes(lines[0] + bytes(range(128, 256)) + b"\n" + b"".join(lines[1:]))
    message = _unify_error(tiny_data_dir, source)
    assert message.startswith(f"{path}, line 2: not UTF-8 text (byte 0x80)"), message


@pytest.mark.parametrize(("source", "rel"), CASES)
def test_compressed_file_under_the_plain_name(tiny_data_dir: Path, source: str, rel: str) -> None:
    path = tiny_data_dir / rel
    path.write_bytes(gzip.compress(path.read_bytes()))
    message = _unify_error(tiny_data_dir, source)
    assert message.startswith(f"{path}, line "), message
    assert "not UTF-8 text" in message or "not valid JSON" in message


@pytest.mark.parametrize(("source", "rel"), CASES)
def test_download_cut_off_mid_record(tiny_data_dir: Path, source: str, rel: str) -> None:
    path = tiny_data_dir / rel
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if rel.endswith(".jsonl"):
        cut = "".join(lines[:3]) + lines[3][: len(lines[3]) // 2]  # line 4 ends half-way
        expected = f"{path}, line 4: not valid JSON"
    else:
        cut = text[: len(text) // 2]  # SVAMP.json is one JSON list
        expected = f"{path}, line "
    path.write_text(cut, encoding="utf-8")
    message = _unify_error(tiny_data_dir, source)
    assert message.startswith(expected), message


@pytest.mark.parametrize(("source", "rel"), CASES)
def test_empty_file(tiny_data_dir: Path, source: str, rel: str) -> None:
    path = tiny_data_dir / rel
    path.write_bytes(b"")
    assert _unify_error(tiny_data_dir, source) == f"{path}: empty file"


@pytest.mark.parametrize(
    ("source", "rel", "field"),
    [
        ("gsm8k", "gsm8k/train.jsonl", "answer"),
        ("math", "math/test.jsonl", "solution"),
        ("math", "math/train.jsonl", "level"),
        ("svamp", "svamp/SVAMP.json", "Equation"),
    ],
)
def test_record_without_a_column(tiny_data_dir: Path, source: str, rel: str, field: str) -> None:
    """The JSON analogue of a CSV with a missing column (no source is read from CSV)."""
    path = tiny_data_dir / rel
    if rel.endswith(".jsonl"):
        lines = path.read_text(encoding="utf-8").splitlines()
        record = json.loads(lines[2])
        del record[field]
        lines[2] = json.dumps(record)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        where = f"{path}, line 3, field '{field}'"
    else:
        rows = json.loads(path.read_text(encoding="utf-8"))
        del rows[2][field]
        path.write_text(json.dumps(rows), encoding="utf-8")
        where = f"{path}, row 2, field '{field}'"
    assert _unify_error(tiny_data_dir, source) == f"{where}: missing field"


def test_directory_where_a_file_belongs(tiny_data_dir: Path) -> None:
    path = tiny_data_dir / "gsm8k" / "test.jsonl"
    path.unlink()
    path.mkdir()
    assert _unify_error(tiny_data_dir, "gsm8k") == f"{path}: is a directory, expected a file"


def test_unreadable_file(tiny_data_dir: Path) -> None:
    path = tiny_data_dir / "math" / "math500_test.jsonl"
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: file modes do not stop reads")
        assert _unify_error(tiny_data_dir, "math").startswith(f"{path}: cannot read (Permission denied)")
    finally:
        path.chmod(0o644)


def test_sources_that_leave_no_training_problems(tiny_data_dir: Path) -> None:
    """SVAMP alone with a hold-out as large as the file: nothing to train on. Before, unify
    published it and the run died two stages later with "SFT rows are empty"."""
    with pytest.raises(GlyphError) as exc:
        unify(UnifyConfig(sources=["svamp"], svamp_holdout=1000), tiny_data_dir)
    assert str(exc.value).startswith("unify: no train problems left from sources svamp (60 records read")
