"""Read GSM8K, SVAMP and MATH from local upstream files or from the Hugging Face Hub.

Each loader validates every row and turns it into a *source record*: a dict with
``id, source, split, question, solution, answer, level, type, math500``. ``level`` is the raw
per-source difficulty integer (MATH level, GSM8K solution steps, SVAMP equation operators);
splits, buckets and de-duplication are decided later in :mod:`glyph_core.unify`.

Local layout (as in ``../shared/data``, see its README)::

    gsm8k/{train,test}.jsonl          question, answer ("... #### 18")
    svamp/SVAMP.json                  JSON list: ID, Body, Question, Equation, Answer (float), Type
    math/{train,test}.jsonl           problem, level ("Level 3"), type, solution, unique_id
    math/math500_test.jsonl           unique_id (flags the MATH-500 subset of MATH test)

Hub (no network in CI: kept thin, tested with a fake ``load_dataset``): ids, configs and
columns in :data:`HUB_SOURCES`. Revisions are pinned there; pass ``revisions=`` to override.
SVAMP's Hub split (ChilleD/SVAMP, a random 700/300 by the uploader) is ignored: both splits are
read and :mod:`glyph_core.unify` applies the same hash hold-out as for the local file.
MATH on the Hub has no ``unique_id``; a problem whose text is in MATH-500 takes its id from
there, every other one gets ``math/<split>/<subject>/hf-<row>``.

Every malformed input raises :class:`~glyph_core.errors.SourceError` naming the file, the line
or row, and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glyph_core.answers import gsm8k_gold, math_gold, svamp_gold
from glyph_core.errors import SourceError

SOURCES: tuple[str, ...] = ("gsm8k", "svamp", "math")
MATH_SUBJECTS: tuple[str, ...] = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)

Record = dict[str, Any]


@dataclass(frozen=True)
class HubSource:
    hub_id: str
    configs: tuple[str | None, ...]
    splits: tuple[str, ...]
    revision: str | None


# Revisions: set the commit sha you validated; None loads the default branch (not reproducible).
HUB_SOURCES: dict[str, HubSource] = {
    "gsm8k": HubSource("openai/gsm8k", ("main",), ("train", "test"), None),
    "svamp": HubSource("ChilleD/SVAMP", (None,), ("train", "test"), None),
    "math": HubSource("EleutherAI/hendrycks_math", MATH_SUBJECTS, ("train", "test"), None),
    "math500": HubSource("HuggingFaceH4/MATH-500", (None,), ("test",), None),
}


# ---------------------------------------------------------------------------------------------
# row access with located errors


@dataclass(frozen=True)
class Loc:
    """Where a row came from, to build errors that name file, line/row and field."""

    path: str
    line: int | None = None
    row: int | None = None

    def error(self, message: str, field: str | None = None) -> SourceError:
        return SourceError(message, path=self.path, line=self.line, row=self.row, field=field)


_TYPE_NAMES = {str: "string", float: "number", int: "integer", dict: "object", list: "list"}


def _field(obj: Any, name: str, kind: type | tuple[type, ...], loc: Loc) -> Any:
    if not isinstance(obj, dict):
        raise loc.error(f"wrong type: expected a JSON object, got {type(obj).__name__}")
    if name not in obj or obj[name] is None:
        raise loc.error("missing field", field=name)
    value = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise loc.error(f"wrong type: expected {want}, got {type(value).__name__}", field=name)
    return value


def _text(obj: Any, name: str, loc: Loc) -> str:
    value = _field(obj, name, str, loc)
    if not value.strip():
        raise loc.error("empty string", field=name)
    return value


# ---------------------------------------------------------------------------------------------
# readers


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; a missing, empty or unreadable file is a `SourceError` naming it."""
    if path.is_dir():
        raise SourceError("is a directory, expected a file", path=str(path))
    if not path.is_file():
        raise SourceError("file not found", path=str(path))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read ({exc.strerror or exc})", path=str(path)) from None
    if not data:
        raise SourceError("empty file", path=str(path))
    return data


def _decode(raw: bytes, path: Path, line: int | None = None) -> str:
    """UTF-8 text, or an error that says where the bytes stop being text: the usual cause is a
    binary or compressed file (a `.gz`, a Parquet file) saved under the expected name."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if line is None:  # a whole file: name the line the bad byte is on
            line = raw[: exc.start].count(b"\n") + 1
        raise SourceError(
            f"not UTF-8 text (byte 0x{raw[exc.start]:02x}): a binary or compressed file under this name?",
            path=str(path),
            line=line,
        ) from None


def read_jsonl(path: Path) -> Iterator[tuple[Loc, Any]]:
    """Yield (location, parsed object) per non-blank line; errors name the 1-based line."""
    seen = False
    for lineno, raw in enumerate(_read_bytes(path).splitlines(), start=1):
        loc = Loc(str(path), line=lineno)
        line = _decode(raw, path, lineno)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise loc.error(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        seen = True
        yield loc, obj
    if not seen:
        raise SourceError("empty file (no JSON lines)", path=str(path))


def read_json_list(path: Path) -> Iterator[tuple[Loc, Any]]:
    """Yield (location, element) of a JSON list; errors name the 0-based row."""
    text = _decode(_read_bytes(path), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"not valid JSON ({exc.msg})", path=str(path), line=exc.lineno) from None
    if not isinstance(data, list):
        raise SourceError(
            f"wrong type: expected a JSON list of records, got {type(data).__name__}", path=str(path)
        )
    if not data:
        raise SourceError("empty file (empty list)", path=str(path))
    for i, obj in enumerate(data):
        yield Loc(str(path), row=i), obj


# ---------------------------------------------------------------------------------------------
# per-source row parsers (shared by the local and the Hub path)


def _gsm8k_steps(answer: str) -> int:
    body = answer.rsplit("####", 1)[0]
    return sum(1 for line in body.splitlines() if line.strip())


def gsm8k_record(obj: Any, split: str, index: int, loc: Loc) -> Record:
    question = _text(obj, "question", loc)
    answer = _text(obj, "answer", loc)
    try:
        gold = gsm8k_gold(answer)
    except ValueError as exc:
        raise loc.error(str(exc), field="answer") from None
    return {
        "id": f"gsm8k/{split}/{index}",
        "source": "gsm8k",
        "split": split,
        "question": question.strip(),
        "solution": answer,
        "answer": gold,
        "level": _gsm8k_steps(answer),
        "type": None,
        "math500": False,
    }


def svamp_operators(equation: str) -> int:
    """Binary operators in a SVAMP equation: its tokens are space separated, '( 76.0 - 25.0 )'."""
    return sum(1 for tok in equation.split() if tok in {"+", "-", "*", "/"})


def svamp_record(obj: Any, loc: Loc) -> Record:
    sid = _text(obj, "ID", loc)
    body = _text(obj, "Body", loc).strip()
    question = _text(obj, "Question", loc).strip()
    equation = _text(obj, "Equation", loc)
    answer = _field(obj, "Answer", (int, float), loc)
    kind = _field(obj, "Type", str, loc)
    # Upstream typo, one row: "Common-Divison".
    kind = "Common-Division" if kind == "Common-Divison" else kind
    return {
        "id": f"svamp/{sid}",
        "source": "svamp",
        "split": None,  # SVAMP has no upstream split; unify assigns the hash hold-out
        "question": f"{body} {question}",  # upstream SVAMP code joins Body and Question this way
        "solution": equation.strip(),
        "answer": svamp_gold(answer),
        "level": svamp_operators(equation),
        "type": kind,
        "math500": False,
    }


_LEVEL = re.compile(r"Level (\d)")


def math_record(obj: Any, split: str, loc: Loc, unique_id: str | None, math500: set[str]) -> Record:
    problem = _text(obj, "problem", loc)
    solution = _text(obj, "solution", loc)
    level_raw = _field(obj, "level", (str, int), loc)
    kind = _text(obj, "type", loc)
    if unique_id is None:
        unique_id = _text(obj, "unique_id", loc)
    m = re.fullmatch(r"(train|test)/([a-z_]+)/(\d+)\.json", unique_id)
    if not m:
        raise loc.error(
            f"unexpected unique_id {unique_id!r} (want '<split>/<subject>/<n>.json')", "unique_id"
        )
    if isinstance(level_raw, int):
        level: int | None = level_raw
    else:
        lm = _LEVEL.fullmatch(level_raw.strip())
        if lm is None and level_raw.strip() != "Level ?":
            raise loc.error(f"unexpected level {level_raw!r} (want 'Level 1'..'Level 5')", "level")
        level = int(lm.group(1)) if lm else None  # "Level ?" (2 train rows) -> unknown
    try:
        gold: str | None = math_gold(solution)
    except ValueError:
        gold = None  # e.g. train/number_theory/7115 has an empty \boxed{}: unify drops and counts it
    return {
        "id": f"math/{m.group(1)}/{m.group(2)}/{m.group(3)}",
        "source": "math",
        "split": split,
        "question": problem.strip(),
        "solution": solution,
        "answer": gold,
        "level": level,
        "type": kind,
        "math500": unique_id in math500,
    }


# ---------------------------------------------------------------------------------------------
# local


def load_local(name: str, data_dir: str | Path) -> list[Record]:
    """All records of one source from a directory in the upstream layout."""
    root = Path(data_dir)
    if not root.is_dir():
        raise SourceError("data directory not found", path=str(root))
    if name == "gsm8k":
        out = []
        for split in ("train", "test"):
            path = root / "gsm8k" / f"{split}.jsonl"
            out += [gsm8k_record(obj, split, loc.line - 1, loc) for loc, obj in read_jsonl(path)]  # type: ignore[operator]
        return out
    if name == "svamp":
        return [svamp_record(obj, loc) for loc, obj in read_json_list(root / "svamp" / "SVAMP.json")]
    if name == "math":
        math500 = {
            _text(obj, "unique_id", loc) for loc, obj in read_jsonl(root / "math" / "math500_test.jsonl")
        }
        out = []
        for split in ("train", "test"):
            path = root / "math" / f"{split}.jsonl"
            out += [math_record(obj, split, loc, None, math500) for loc, obj in read_jsonl(path)]
        return out
    raise unknown_source(name)


def unknown_source(name: str) -> SourceError:
    return SourceError(f"unknown source {name!r}; expected one of {', '.join(SOURCES)}", field="sources")


# ---------------------------------------------------------------------------------------------
# Hub


LoadDataset = Callable[..., Iterable[Mapping[str, Any]]]


def _hub_rows(spec: HubSource, config: str | None, split: str, revision: str | None, load: LoadDataset):
    where = f"hf://{spec.hub_id}@{revision or 'default'}[{config or 'default'}/{split}]"
    try:
        rows = load(spec.hub_id, config, split=split, revision=revision)
    except Exception as exc:  # network, missing config, auth: name the dataset
        raise SourceError(f"cannot load from the Hub: {exc}", path=where) from exc
    seen = False
    for i, row in enumerate(rows):
        seen = True
        yield Loc(where, row=i), dict(row)
    if not seen:
        raise SourceError("empty split", path=where)


def load_hub(
    name: str, revisions: Mapping[str, str | None] | None = None, load: LoadDataset | None = None
) -> list[Record]:
    """All records of one source from the Hub (``load`` defaults to ``datasets.load_dataset``)."""
    if name not in SOURCES:
        raise unknown_source(name)
    if load is None:
        from datasets import load_dataset

        load = load_dataset
    loader: LoadDataset = load
    revisions = revisions or {}

    def rev(key: str) -> str | None:
        return revisions.get(key, HUB_SOURCES[key].revision)

    spec = HUB_SOURCES[name]
    out: list[Record] = []
    if name == "gsm8k":
        for split in spec.splits:
            rows = _hub_rows(spec, "main", split, rev(name), loader)
            out += [gsm8k_record(obj, split, loc.row, loc) for loc, obj in rows]  # type: ignore[arg-type]
    elif name == "svamp":
        for split in spec.splits:
            out += [svamp_record(obj, loc) for loc, obj in _hub_rows(spec, None, split, rev(name), loader)]
    else:
        m5 = HUB_SOURCES["math500"]
        by_text = {
            _text(obj, "problem", loc).strip(): _text(obj, "unique_id", loc)
            for loc, obj in _hub_rows(m5, None, "test", rev("math500"), loader)
        }
        math500 = set(by_text.values())
        for subject in MATH_SUBJECTS:
            for split in spec.splits:
                for loc, obj in _hub_rows(spec, subject, split, rev(name), loader):
                    problem = _text(obj, "problem", loc).strip()
                    uid = by_text.get(problem) if split == "test" else None
                    rec = math_record(obj, split, loc, uid or f"{split}/{subject}/0.json", math500)
                    if uid is None:
                        rec["id"] = f"math/{split}/{subject}/hf-{loc.row}"
                    out.append(rec)
    return out


def load_source(
    name: str,
    data_dir: str | Path | None = None,
    revisions: Mapping[str, str | None] | None = None,
    load: LoadDataset | None = None,
) -> list[Record]:
    """One source's records: from ``data_dir`` when given, else from the Hub (``load_hub``)."""
    if name not in SOURCES:
        raise unknown_source(name)
    return load_local(name, data_dir) if data_dir is not None else load_hub(name, revisions, load)
