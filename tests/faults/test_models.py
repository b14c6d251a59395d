"""A trained model is checked like a table: a damaged file is found at the cache check and the
model recomputed; an identical retrain publishes an identical manifest; a training that ran no
optimizer step publishes nothing.

Before: the cache check of a model only looked for its files, so a flipped byte in a trained
adapter came back Cached, evaluate failed on it every time and only `--refresh train` recovered;
`adapter_config.json` listed `target_modules` in a different order from process to process and
the manifest held the run's seconds and tokens/s, so an identical retrain changed the manifest
hash and reran evaluate; `train.epochs=0` published an adapter trained for 0 steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pipeline_helpers import cached, harness, make_tiny_data, real_data_dir, run  # noqa: F401

from glyph_core import train
from glyph_core.errors import GlyphError, StorageError
from glyph_core.outputs import StageOutput, verify_output
from glyph_core.profiles import load_profile
from glyph_core.storage import ModelRef, Store
from glyph_core.trainer import train_sft
from tests.faults.helpers import REPO
from tests.test_train import sft_rows

ADAPTER = "adapter_model.safetensors"


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Store, StageOutput]:
    store = Store(tmp_path / "store").ensure()
    ref = store.write_table(sft_rows(), "rewrite", "k")
    return store, train.run(store, load_profile("tiny").train, sft=ref)  # type: ignore[arg-type]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _model_dir(store: Store, out: StageOutput) -> Path:
    return Path(out.refs["model"].uri)


def test_flipped_byte_in_an_adapter_fails_the_cache_check(trained: tuple[Store, StageOutput]) -> None:
    store, out = trained
    assert verify_output(store, out)
    adapter = _model_dir(store, out) / ADAPTER
    _flip_a_byte(adapter)
    assert not verify_output(store, out)
    # the damaged file is moved aside, so every later check (and the train stage) sees it gone
    assert not adapter.exists() and adapter.with_name(ADAPTER + ".damaged").exists()


def test_large_files_are_checked_by_size_then_hashed_at_load(
    trained: tuple[Store, StageOutput], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing small enough to hash at the cache check (a full-weight model's shards), a
    flipped byte passes the cache check, fails when the model is loaded, and is moved aside
    there, so the next cache check fails and the model is recomputed instead of failing again."""
    monkeypatch.setenv("GLYPH_VERIFY_MAX_BYTES", "0")
    store, out = trained
    adapter = _model_dir(store, out) / ADAPTER
    _flip_a_byte(adapter)
    assert verify_output(store, out)  # same size, not hashed
    with pytest.raises(StorageError, match=f"{ADAPTER}: content does not match the manifest; moved aside"):
        store.get_dir(out.refs["model"])  # type: ignore[arg-type]
    assert not verify_output(store, out)


def test_a_truncated_file_fails_the_cache_check_by_size(
    trained: tuple[Store, StageOutput], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLYPH_VERIFY_MAX_BYTES", "0")
    store, out = trained
    adapter = _model_dir(store, out) / ADAPTER
    adapter.write_bytes(adapter.read_bytes()[:-10])
    assert not verify_output(store, out)


def test_pipeline_rerun_recomputes_a_damaged_adapter(harness: None, tmp_path: Path) -> None:  # noqa: F811
    data = make_tiny_data(real_data_dir(), tmp_path / "data")
    store = str(tmp_path / "store")
    first = run(store, data)
    model = Path(next(r for r in first["stages"] if r["stage"] == "train")["refs"]["model"])
    _flip_a_byte(model / ADAPTER)
    again = run(store, data)  # a plain rerun
    assert cached(again)["train"] is False
    # the retrain wrote the same bytes (same manifest hash), so evaluate's key holds and it stays cached
    assert [r["refs"] for r in again["stages"]] == [r["refs"] for r in first["stages"]]
    assert cached(again)["evaluate"] is True
    assert Store(store).verify_model(_model_ref(model)) is not None  # every file matches its hash again


def _model_ref(uri: Path) -> ModelRef:
    body = (uri / "manifest.json").read_bytes()
    manifest = json.loads(body)
    sha = hashlib.sha256(body).hexdigest()
    return ModelRef(uri=str(uri), sha256=sha, base_model=manifest["base_model"], kind=manifest["kind"])


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {repo!r})
    from glyph_core import train
    from glyph_core.profiles import load_profile
    from glyph_core.storage import ModelRef, Store
    from tests.test_train import sft_rows
    store = Store({store!r}).ensure()
    ref = store.write_table(sft_rows(), "rewrite", "k")
    out = train.run(store, load_profile("tiny").train, sft=ref)
    print("RESULT " + json.dumps({{"sha": out.refs["model"].sha256, "uri": out.refs["model"].uri}}))
    """
)


@pytest.mark.timeout(600)
def test_identical_retrains_publish_identical_manifests(tmp_path: Path) -> None:
    """Two processes (different hash seeds, so PEFT's sets iterate differently), two stores."""
    results = []
    for i, seed in enumerate(("1", "2")):
        script = TRAIN_SCRIPT.format(repo=str(REPO), store=str(tmp_path / f"store{i}"))
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=500,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        results.append(json.loads(line.removeprefix("RESULT ")))
    a, b = (Path(r["uri"]) for r in results)
    config_a, config_b = (json.loads((d / "adapter_config.json").read_text()) for d in (a, b))
    assert config_a["target_modules"] == sorted(config_a["target_modules"])
    assert (a / "adapter_config.json").read_bytes() == (b / "adapter_config.json").read_bytes()
    assert results[0]["sha"] == results[1]["sha"], (
        json.loads((a / "manifest.json").read_text()),
        json.loads((b / "manifest.json").read_text()),
    )


def test_zero_optimizer_steps_publish_nothing(tmp_path: Path) -> None:
    """The config refuses `epochs=0` (tests/faults/test_config.py); the trainer checks too, so a
    config that slips past (built without validation) still cannot publish an untrained adapter."""
    cfg = load_profile("tiny").train.model_copy(update={"epochs": 0.0, "max_steps": -1})
    with pytest.raises(GlyphError, match="training ran 0 optimizer steps"):
        train_sft(sft_rows(), cfg, tmp_path / "out")  # type: ignore[arg-type]
    assert not (tmp_path / "out" / "model").exists()
