"""Training works in a directory of its own store and key, under a lock: the same key on the same
store resumes, nothing else does, and two processes on one key train once.

Before: every store and user trained in `/tmp/glyph-train/<key>`. Two runs with the same inputs
on different stores crashed (one read the other's half-written checkpoint: `JSONDecodeError`),
and a run could resume from another store's (or another user's) checkpoints.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from glyph_core import train
from glyph_core.config import TrainConfig
from glyph_core.launch import run_training
from glyph_core.profiles import load_profile
from glyph_core.storage import DatasetRef, Store
from tests.faults.helpers import REPO
from tests.test_train import sft_rows


def _cfg(**update: object) -> TrainConfig:
    return load_profile("tiny").train.model_copy(update=update)  # type: ignore[return-value]


def _sft(store: Store) -> DatasetRef:
    return store.write_table(sft_rows(), "rewrite", "k")


def test_work_dir_is_per_store_and_key(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    assert train.work_dir_for(a, "k1") == tmp_path / "a" / "_work" / "train" / "k1"
    assert train.work_dir_for(a, "k1") != train.work_dir_for(b, "k1")
    assert train.work_dir_for(a, "k1") != train.work_dir_for(a, "k2")
    s3a, s3b = Store("s3://bucket-a/runs"), Store("s3://bucket-b/runs")  # no request is made
    assert train.work_dir_for(s3a, "k1") != train.work_dir_for(s3b, "k1")
    assert train.work_dir_for(s3a, "k1").parts[-4].startswith("glyph-work-")  # per user


def test_same_key_on_another_store_never_resumes_from_this_one(tmp_path: Path) -> None:
    """A checkpoint left by a crashed run on store A is resumed by A's rerun, not by B's run."""
    a, b = Store(tmp_path / "a").ensure(), Store(tmp_path / "b").ensure()
    cfg = _cfg(max_steps=2, save_steps=1)
    ref_a, ref_b = _sft(a), _sft(b)
    key = train.key(cfg, sft=ref_a)
    assert key == train.key(cfg, sft=ref_b)  # same inputs, same key
    # store A's run stopped after step 1 (as a killed run would have), leaving checkpoint-1
    run_training(ref_a, cfg.model_copy(update={"max_steps": 1}), train.work_dir_for(a, key), store=a)
    assert (train.work_dir_for(a, key) / "checkpoints" / "checkpoint-1").is_dir()

    out_b = train.run(b, cfg, sft=ref_b)
    assert out_b.stats.extra["resumed_from"] is None  # B trained from scratch
    out_a = train.run(a, cfg, sft=ref_a)
    assert out_a.stats.extra["resumed_from"].endswith("checkpoint-1")  # A resumed its own
    assert not train.work_dir_for(a, key).exists() and not train.work_dir_for(b, key).exists()


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {repo!r})
    import pyarrow as pa
    from glyph_core import train
    from glyph_core.profiles import load_profile
    from glyph_core.storage import Store
    from tests.test_train import sft_rows
    store = Store({store!r}).ensure()
    ref = store.write_table(sft_rows(), "rewrite", "k")
    cfg = load_profile("tiny").train.model_copy(update={{"max_steps": 6}})
    out = train.run(store, cfg, sft=ref)
    print("RESULT " + json.dumps({{"sha": out.refs["model"].sha256, "reused": out.stats.extra.get("reused")}}))
    """
)


@pytest.mark.timeout(600)
def test_two_processes_on_one_key_train_once(tmp_path: Path) -> None:
    """The second waits for the first's lock, then takes the model it published."""
    script = TRAIN_SCRIPT.format(repo=str(REPO), store=str(tmp_path / "store"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=500)
        assert proc.returncode == 0, err.decode()[-3000:]
        (line,) = [x for x in out.decode().splitlines() if x.startswith("RESULT ")]
        results.append(json.loads(line.removeprefix("RESULT ")))
    assert results[0]["sha"] == results[1]["sha"]
    assert sorted(r["reused"] for r in results) == [False, True]


def test_lock_waits_for_the_holder_and_is_freed_when_it_dies(tmp_path: Path) -> None:
    work = tmp_path / "store" / "_work" / "train" / "k"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from pathlib import Path; from glyph_core.train import locked\n"
            "with locked(Path(sys.argv[2])):\n print('held', flush=True); time.sleep(60)",
            str(REPO),
            str(work),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    killer = subprocess.Popen(["sh", "-c", f"sleep 2; kill -9 {holder.pid}"])
    with train.locked(work):  # waits until the kernel frees the dead holder's lock
        waited = time.monotonic() - t0
    killer.wait()
    holder.wait()
    assert 1.5 < waited < 30
    assert "pid" in work.with_name("k.lock").read_text()
