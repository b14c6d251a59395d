"""Multi-GPU scale-out, the part a CPU can check (docs/multi_gpu.md says what remains unrun).

Generation: shard groups cover every shard once; a final pass after K workers only
concatenates, and after a worker that never ran regenerates exactly that worker's shards; the
inline fan-out with workers=2 gives the same traces as one worker.
Training: `accelerate launch` with one CPU process writes the artifact the in-process path
writes (same files, same manifest keys, same weights), and a rerun resumes from its checkpoint.
The benchmark refuses clearly on fewer than 2 GPUs.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glyph_core import launch, train
from glyph_core.config import GenerateConfig, TeacherConfig, TrainConfig
from glyph_core.errors import GlyphError
from glyph_core.generate import generate_shard_group, generate_traces, shard_group
from glyph_core.outputs import ref_of
from glyph_core.stages import get
from glyph_core.storage import Store
from tests import fixtures_models as fm
from tests.fixtures_models import publish_problems, real_problem_rows
from tests.test_train import cfg_for

store = fm.store
REPO = Path(__file__).resolve().parents[1]


def _shards(root: str) -> set[str]:
    return {p.parent.name for p in (Path(root) / "generate" / "shards").glob("*/data.parquet")}


# -- generation fan-out ------------------------------------------------------------------------


def test_shard_groups_partition_the_shards() -> None:
    for n in (0, 1, 5, 12):
        for k in (1, 2, 3, 7):
            groups = [shard_group(n, w, k) for w in range(k)]
            assert sorted(i for g in groups for i in g) == list(range(n))
    assert shard_group(5, 1, 2) == [1, 3]
    with pytest.raises(GlyphError):
        shard_group(5, 2, 2)
    assert GenerateConfig(workers=4).key_dump() == GenerateConfig().key_dump()  # speed only


def test_final_pass_fills_in_only_a_dead_workers_shards(store: Store) -> None:
    ref = publish_problems(store, real_problem_rows(per_source=4))  # 12 problems
    cfg = GenerateConfig(teacher=TeacherConfig(backend="reference"), shard_size=2, workers=3)  # 6 shards
    done = [generate_shard_group(store, ref, cfg, w, 3) for w in (0, 2)]  # worker 1 "died"
    assert [(g.shards, g.generated, g.reused) for g in done] == [(2, 2, 0), (2, 2, 0)]
    before = _shards(store.root)
    assert len(before) == 4

    final = generate_traces(store, ref, cfg)
    assert (final.shards_total, final.shards_reused, final.shards_generated) == (6, 4, 2)
    assert len(_shards(store.root) - before) == 2  # only worker 1's shards were generated

    one = generate_traces(Store(Path(store.root).parent / "solo"), ref.model_copy(), cfg)
    assert final.ref.sha256 == one.ref.sha256  # bytes do not depend on who generated what
    # a worker rerun after the fact finds its group done
    late = generate_shard_group(store, ref, cfg, 1, 3)
    assert (late.generated, late.reused) == (0, 2)


def test_inline_fan_out_with_two_workers(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.dispatch import execute

    monkeypatch.delenv("GLYPH_GPU_DEPLOYMENT", raising=False)
    ref = publish_problems(store, real_problem_rows(per_source=3))  # 9 problems
    cfg = GenerateConfig(teacher=TeacherConfig(backend="reference", n=2), shard_size=2, workers=2)
    out = execute(get("generate"), store, cfg, {"problems": ref})
    assert out.stats.extra["shards_total"] == 5
    assert out.stats.extra["shards_reused"] == 5 and out.stats.extra["shards_generated"] == 0
    assert out.stats.extra["groups_generated"] == 5 and out.stats.extra["workers"] == 2
    assert out.stats.extra["groups_lost"] == 0
    single = execute(get("generate"), store, cfg.model_copy(update={"workers": 1}), {"problems": ref})
    assert single.ref == out.ref and single.key == out.key


def test_group_cfg_pins_one_gpu_per_worker_for_transformers() -> None:
    from glyph_core.generate import group_cfg

    cfg = GenerateConfig(teacher=TeacherConfig(backend="transformers"), workers=2)
    assert group_cfg(cfg, 1, 2, gpus=2).teacher.device == "cuda:1"
    assert group_cfg(cfg, 1, 2, gpus=1).teacher.device is None  # fewer GPUs than workers
    ref_cfg = GenerateConfig(teacher=TeacherConfig(backend="reference"), workers=2)
    assert group_cfg(ref_cfg, 1, 2, gpus=2) == ref_cfg


# -- training through accelerate ---------------------------------------------------------------


def _train_cfg(model: str, **kw) -> TrainConfig:
    return cfg_for(model, **{"max_steps": 6, "save_steps": 3, "device": "cpu", **kw})


def test_num_gpus_is_in_the_key_and_launcher_is_not(tmp_path: Path) -> None:
    from tests.test_train import sft_rows

    ref = Store(tmp_path).write_table(sft_rows(4), "rewrite", "k")
    cfg = _train_cfg("tiny-random")
    assert train.key(cfg.model_copy(update={"num_gpus": 2}), sft=ref) != train.key(cfg, sft=ref)
    assert train.key(cfg.model_copy(update={"launcher": "accelerate"}), sft=ref) == train.key(cfg, sft=ref)
    assert not launch.uses_launcher(cfg)
    assert launch.uses_launcher(cfg.model_copy(update={"num_gpus": 2}))
    with pytest.raises(GlyphError):
        launch.uses_launcher(cfg.model_copy(update={"num_gpus": 2, "launcher": "inline"}))
    cmd = launch.accelerate_command(cfg.model_copy(update={"num_gpus": 4, "device": "cuda"}), Path("a.json"))
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd
    one = launch.accelerate_command(cfg, Path("a.json"))
    assert "--cpu" in one and "--multi_gpu" not in one
    assert cmd[-3:] == ["-m", "glyph_core.train_worker", "a.json"]
    assert launch.child_env()["NCCL_NVLS_ENABLE"] == "0"


def test_accelerate_launch_matches_inline_and_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import load_file

    from glyph_core.models import tiny_model_dir
    from tests.test_train import sft_rows

    tiny = str(tiny_model_dir("llama"))
    st = Store(tmp_path / "store")
    ref = st.write_table(sft_rows(12), "rewrite", "k")
    cfg = _train_cfg(tiny, launcher="accelerate")
    work = tmp_path / "work"

    # a first launch that stops at step 3 (as a killed run would have), leaving checkpoint-3;
    # the child's steps reach the parent's progress callback through progress.json
    # and its log lines (the trainer's loss per step) are logged again in this process
    steps: list[tuple[int, int]] = []
    with caplog.at_level(logging.INFO, logger="glyph_core"):
        first = launch.run_training(
            ref, cfg.model_copy(update={"max_steps": 3}), work, store=st, progress=lambda *a: steps.append(a)
        )
    assert first.model is None and (work / "checkpoints" / "checkpoint-3").is_dir()
    assert steps and steps[-1] == (3, 3) and steps == sorted(set(steps)), steps
    relayed = [r.getMessage() for r in caplog.records if r.name == "glyph_core.trainer"]
    assert relayed[0].startswith("train speed settings: Speed("), relayed  # how the child trains
    assert [m.split(" loss ")[0] for m in relayed[1:]] == ["step 1/3", "step 2/3", "step 3/3"], relayed
    # the stage reruns in the same work dir: the child resumes and publishes
    model_ref = train.run(st, cfg, sft=ref, work_dir=work).refs["model"]
    manifest = st.read_json(f"{model_ref.uri}/manifest.json")
    assert st.read_json(model_ref.uri.removesuffix("/model") + "/run.json")["resumed_from"].endswith(
        "checkpoint-3"
    )
    metrics = st.read_table(_metrics_ref(st, ref, cfg))
    losses = metrics.column("loss").to_pylist()
    assert metrics.column("step").to_pylist() == list(range(1, 7))  # history survives the resume
    assert losses[-1] < losses[0] - 0.05, losses

    inline_store = Store(tmp_path / "inline")
    inline_ref = inline_store.write_table(sft_rows(12), "rewrite", "k")
    inline_cfg = cfg.model_copy(update={"launcher": "inline"})
    inline_model = train.run(inline_store, inline_cfg, sft=inline_ref, work_dir=tmp_path / "work2").refs[
        "model"
    ]
    inline_manifest = inline_store.read_json(f"{inline_model.uri}/manifest.json")
    assert inline_model.uri.split("/train/")[1] == model_ref.uri.split("/train/")[1]  # same key
    assert set(manifest["files"]) == set(inline_manifest["files"])
    assert set(manifest) == set(inline_manifest)
    a = load_file(st.get_dir(model_ref) / "adapter_model.safetensors")
    b = load_file(inline_store.get_dir(inline_model) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_two_processes_over_gloo_write_one_artifact(tmp_path: Path) -> None:
    """Real data parallelism on CPU: two ranks, twice the rows per step, rank 0 saves."""
    from glyph_core.models import tiny_model_dir
    from glyph_core.trainer import train_sft
    from tests.test_train import sft_rows

    tiny = str(tiny_model_dir("llama"))
    cfg = _train_cfg(tiny, max_steps=2, save_steps=2, num_threads=1)
    two = launch.run_training(sft_rows(12), cfg.model_copy(update={"num_gpus": 2}), tmp_path / "two")
    one = train_sft(sft_rows(12), cfg, tmp_path / "one", keep_model=False)
    assert two.manifest["config"]["num_gpus"] == 2 and two.manifest["metrics"]["steps"] == 2
    assert two.manifest["metrics"]["tokens_seen"] > 1.5 * one.manifest["metrics"]["tokens_seen"]
    assert {p.name for p in two.model_dir.iterdir()} == {p.name for p in one.model_dir.iterdir()}
    assert (tmp_path / "two" / "checkpoints" / "checkpoint-2").is_dir()


def _metrics_ref(st: Store, ref, cfg):
    return ref_of(st, st.uri("train", train.key(cfg, sft=ref), "metrics.parquet"))


# -- benchmark ---------------------------------------------------------------------------------


def test_benchmark_refuses_without_two_gpus(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "multi_gpu.py"), "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs at least 2 GPUs" in proc.stderr
    assert not (tmp_path / "r.json").exists()
    help_ = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "multi_gpu.py"), "--help"], capture_output=True, text=True
    )
    assert help_.returncode == 0 and "--gpus" in help_.stdout


def test_deployed_fan_out_dispatches_k_children_and_survives_a_lost_one(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent side of the deployed fan-out with the Prefect calls faked (no server here):
    K child runs with `group=[w, K]`, one of which ends Failed; the final pass, dispatched too,
    fills in its shards."""
    import contextlib
    import types
    import uuid

    import tasks.children as children
    import tasks.dispatch as dispatch

    ref = publish_problems(store, real_problem_rows(per_source=4))  # 12 problems
    cfg = GenerateConfig(teacher=TeacherConfig(backend="reference"), shard_size=2, workers=3)  # 6 shards
    calls: list[dict] = []
    lost: set[str] = set()

    def fake_create_run(deployment_id, *, parameters, tags, job_variables=None, **_):
        calls.append(
            {"name": deployment_id, "parameters": parameters, "tags": tags, "job_variables": job_variables}
        )
        run_id = str(uuid.uuid4())
        worker, workers = parameters["group"]
        if worker == 1:
            lost.add(run_id)  # this GPU worker dies before publishing anything
        else:  # what the child flow does (flows/gpu_stages.py run_child with a group)
            counts = get("generate").fan_out.run_group(
                Store(parameters["store"]),
                GenerateConfig.model_validate(parameters["cfg"]),
                worker=worker,
                workers=workers,
                problems=type(ref).model_validate(parameters["problems"]),
            )
            store.publish_bytes(
                children.result_uri(store, run_id, dispatch.group_result_name("generate", worker)),
                json.dumps(counts).encode(),
            )
        return types.SimpleNamespace(id=run_id, name=f"run-{worker}")

    def fake_wait(run_id, logger=None, **_):
        if run_id in lost:
            raise children.StageRunFailed(f"{run_id} ended Failed")

    client = types.SimpleNamespace(
        read_deployment_by_name=lambda name: types.SimpleNamespace(id=name),
        create_flow_run_from_deployment=fake_create_run,
    )
    monkeypatch.setattr(children, "get_client", lambda **_: contextlib.nullcontext(client))
    monkeypatch.setattr(children, "existing_child", lambda client, tag: None)
    monkeypatch.setattr(dispatch, "wait_for_child", fake_wait)
    final_calls: list[GenerateConfig] = []

    def spy_dispatch(stage, st, target, cfg, refs):  # the final pass, sent to the GPU pool too
        final_calls.append(cfg)
        return dispatch.run_here(stage, st, cfg, refs)

    monkeypatch.setattr(dispatch, "dispatch", spy_dispatch)

    monkeypatch.setenv("GLYPH_FANOUT_GPUS", "0,1")
    out = dispatch.execute(get("generate"), store, cfg, {"problems": ref}, deployment="gpu-a100")
    assert [c["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] for c in calls] == ["0", "1", "0"]
    assert [c["parameters"]["group"] for c in calls] == [[0, 3], [1, 3], [2, 3]]
    assert {c["name"] for c in calls} == {"glyph-generate/gpu-a100"}
    assert len({c["tags"][-1] for c in calls}) == 3  # one reattach tag per group
    assert [c.workers for c in final_calls] == [1]
    assert out.stats.extra["groups_lost"] == 1
    assert (out.stats.extra["shards_reused"], out.stats.extra["shards_generated"]) == (4, 2)
