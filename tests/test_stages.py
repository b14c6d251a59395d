"""The stage declarations (glyph_core/stages.py) and what is derived from them, without Prefect:
the wiring checks, the pipeline config, the `glyph <stage>` commands and their options, and
the teacher backend registry. The derived Prefect task and flow wiring of a new stage are
exercised in tests/test_pipeline_flow.py (`test_a_declared_stage_joins_the_pipeline`).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from glyph_cli import stage_commands
from glyph_core.config import EvalConfig, StrictModel, TeacherConfig
from glyph_core.errors import GlyphError
from glyph_core.profiles import PipelineConfig, load_profile
from glyph_core.stages import RESERVED, Stage, get, names, register, registered, stages
from glyph_core.storage import Store
from glyph_core.teachers import registry
from tests.stage_example import LENGTHS, LengthsConfig
from tests.test_train import sft_rows

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner(env={"COLUMNS": "250"})  # rich wraps long option names in narrow help


def _app() -> typer.Typer:
    app = typer.Typer()
    stage_commands.register(app)
    return app


# -- the declarations --------------------------------------------------------------------------


def test_the_six_stages_are_declared_in_order_and_wired() -> None:
    assert names() == ("unify", "generate", "filter", "rewrite", "train", "evaluate")
    assert {s.name for s in stages() if s.gpu} == {"generate", "train", "evaluate"}
    produced: set[str] = set()
    for stage in stages():
        assert set(stage.inputs) <= produced, stage.name
        produced |= set(stage.outputs)
    assert set(PipelineConfig.model_fields) <= RESERVED  # no stage can shadow the run's own settings


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": ("nowhere",)}, "input 'nowhere' is no earlier stage's output"),
        ({"outputs": ("problems",)}, "output 'problems' is already produced by stage 'unify'"),
        ({"outputs": ()}, "outputs must be non-empty"),
        ({"name": "filter"}, "declared twice"),
        ({"name": "retries"}, "a stage name is"),
        ({"config": dict}, "StrictModel subclass"),
        ({"run": lambda store, cfg, *, sft: None}, "lacks parameter(s) ['progress']"),
        ({"key": lambda cfg: ""}, "lacks parameter(s) ['sft']"),
    ],
)
def test_register_checks_the_wiring_once(change: dict, message: str) -> None:
    bad = dataclasses.replace(LENGTHS, **change)
    with pytest.raises(GlyphError) as info:
        register(bad)
    assert message in str(info.value)
    assert "lengths" not in names()


def test_a_fan_out_field_must_stay_out_of_the_key() -> None:
    from glyph_core.stages import FanOut

    bad = dataclasses.replace(
        LENGTHS, fan_out=FanOut(workers_field="min_chars", run_group=lambda *a, **k: {})
    )
    with pytest.raises(GlyphError, match="kept out of the key"):
        register(bad)


def test_run_with_fails_closed_on_undeclared_outputs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    sft = store.write_table(sft_rows(4), "rewrite", "k")
    liar = dataclasses.replace(LENGTHS, outputs=("lengths", "more"))
    with pytest.raises(GlyphError, match="declared"):
        liar.run_with(store, LengthsConfig(), {"sft": sft})


# -- a new stage, derived everywhere -----------------------------------------------------------


def test_a_declared_stage_gets_its_config_and_overrides() -> None:
    with registered(LENGTHS):
        cfg = load_profile("tiny", {"lengths.min_chars": 7})
        assert cfg.stage_config("lengths") == LengthsConfig(min_chars=7)
        assert load_profile("demo").stage_config("lengths") == LengthsConfig()
        with pytest.raises(GlyphError, match="lengths.min_chars"):
            load_profile("tiny", {"lengths.min_chars": "many"})
    assert not hasattr(load_profile("tiny"), "lengths")  # gone with its declaration


def test_a_declared_stage_gets_its_command(tmp_path: Path) -> None:
    sft = tmp_path / "sft.parquet"
    pq.write_table(sft_rows(6), sft)
    with registered(LENGTHS):
        app = _app()
        help_ = runner.invoke(app, ["lengths", "--help"])
        assert help_.exit_code == 0 and "--min-chars" in help_.output and "[default: 0]" in help_.output
        args = ["lengths", "--sft", str(sft), "-o", str(tmp_path / "out"), "--store", str(tmp_path / "st")]
        res = runner.invoke(app, [*args, "--min-chars", "20"])
        assert res.exit_code == 0, res.output
        table = pq.read_table(tmp_path / "out" / "lengths.parquet")
        assert table.num_rows > 0 and min(table["chars"].to_pylist()) >= 20
        bad = runner.invoke(app, [*args, "--min-chars", "many"])
        assert bad.exit_code != 0 and "min_chars" in bad.output
    assert "lengths" not in get_command(_app()).commands  # type: ignore[attr-defined]


# -- the commands: every setting, defaults from the models -------------------------------------


@pytest.mark.parametrize("name", names())
def test_every_setting_is_an_option_with_the_models_default(name: str) -> None:
    stage = get(name)
    command = get_command(_app()).commands[name]  # type: ignore[attr-defined]
    options = {opt: p for p in command.params for opt in p.opts}
    model = stage.config()
    for setting in stage_commands.settings(stage.config):
        param = options[setting.option]
        value: object = model
        for part in setting.path.split("."):
            value = getattr(value, part)
        assert param.default == value, setting.path  # no hand-copied default can drift
        assert param.required is False
    for name_ in stage.inputs:
        assert options[f"--{name_}"].required


@pytest.mark.parametrize("name", ["generate", "train"])
def test_help_shows_every_setting_with_its_default(name: str) -> None:
    res = runner.invoke(_app(), [name, "--help"])
    assert res.exit_code == 0, res.output
    for setting in stage_commands.settings(get(name).config):
        assert setting.option in res.output, setting.option
    if name == "train":
        assert "[default: Qwen/Qwen2.5-7B-Instruct]" in res.output  # TrainConfig's, not a copy
        assert "--lora-r" in res.output and "[default: 16]" in res.output
    else:
        assert "[reference|transformers|openai|vllm]" in res.output  # the registered backends


def test_profile_then_options(tmp_path: Path) -> None:
    stage = get("train")
    cfg = stage_commands.build_config(stage, "demo", {"max_steps": 3, "lora.r": 4})
    demo = load_profile("demo").stage_config("train")
    assert (
        isinstance(cfg, StrictModel)
        and cfg.model_dump()
        == demo.model_copy(
            update={"max_steps": 3, "lora": demo.lora.model_copy(update={"r": 4})}  # type: ignore[attr-defined]
        ).model_dump()
    )
    with pytest.raises(GlyphError, match="^train.max_steps=.x.: must be a valid integer"):
        stage_commands.build_config(stage, None, {"max_steps": "x"})


# -- teacher backends --------------------------------------------------------------------------


def test_teacher_backends_come_from_the_registry() -> None:
    schema = TeacherConfig.model_json_schema()["properties"]["backend"]
    assert schema["enum"] == list(registry.BACKENDS)
    assert EvalConfig.model_json_schema()["properties"]["backend"]["enum"] == ["transformers", "vllm"]
    with pytest.raises(ValueError, match="reference"):
        TeacherConfig(backend="nope")
    with pytest.raises(ValueError):
        EvalConfig(backend="reference")  # it cannot load a model


def test_make_teacher_builds_a_registered_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        registry.BACKENDS, "echo", registry.Backend(f"{__name__}:EchoTeacher", loads_model=False)
    )
    teacher = registry.make_teacher(TeacherConfig.model_construct(backend="echo", model="m"))
    assert isinstance(teacher, EchoTeacher) and teacher.cfg.model == "m"
    with pytest.raises(GlyphError, match="unknown teacher backend"):
        registry.make_teacher(TeacherConfig.model_construct(backend="gone"))


class EchoTeacher:
    name = "echo"

    def __init__(self, cfg: TeacherConfig) -> None:
        self.cfg = cfg


# -- the layers --------------------------------------------------------------------------------


def test_import_contracts_hold() -> None:
    """glyph_cli -> flows -> tasks -> glyph_core, and glyph_core never imports Prefect."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" not in proc.stdout.lower().replace("0 broken", "")


def test_a_registered_name_is_reserved_once() -> None:
    lengths = Stage(**{f.name: getattr(LENGTHS, f.name) for f in dataclasses.fields(LENGTHS)})
    with registered(lengths), pytest.raises(GlyphError, match="declared twice"):
        register(lengths)
    assert "lengths" not in names()
