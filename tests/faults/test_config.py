"""Settings out of range are refused when the profile is loaded, before anything runs, with one
line that names the dotted setting as the user wrote it and the value given.

Before: `train.learning_rate=-1`, `train.batch_size=0`, `evaluate.per_stratum=-1`,
`evaluate.max_new_tokens=0` and `train.epochs=0` (with `max_steps=-1`) were accepted and failed
minutes later in torch, or ran to a believable 0 % result; a wrong type gave pydantic's
multi-line report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from glyph_core.errors import SettingError
from glyph_core.profiles import PROFILES, load_profile

BAD: list[tuple[dict[str, Any], str]] = [
    # the probes
    ({"train.learning_rate": -1}, "train.learning_rate=-1: must be > 0"),
    ({"train.batch_size": 0}, "train.batch_size=0: must be >= 1"),
    ({"evaluate.per_stratum": -1}, "evaluate.per_stratum=-1: must be >= 1"),
    ({"evaluate.max_new_tokens": 0}, "evaluate.max_new_tokens=0: must be >= 1"),
    ({"train.epochs": 0, "train.max_steps": -1}, "train.epochs=0.0: must be > 0 when max_steps=-1"),
    # every class of numeric setting
    ({"train.max_steps": 0}, "train.max_steps=0: must be -1 (train for `epochs`) or >= 1"),
    ({"train.max_steps": -2}, "train.max_steps=-2: must be >= -1"),
    ({"train.grad_accum": 0}, "train.grad_accum=0: must be >= 1"),
    ({"train.epochs": -1}, "train.epochs=-1: must be >= 0"),
    ({"train.max_seq_len": 8}, "train.max_seq_len=8: must be >= 16"),
    ({"train.warmup_ratio": 1}, "train.warmup_ratio=1: must be < 1"),
    ({"train.lora.r": 0}, "train.lora.r=0: must be >= 1"),
    ({"train.lora.alpha": 0}, "train.lora.alpha=0: must be >= 1"),
    ({"train.lora.dropout": 1.0}, "train.lora.dropout=1.0: must be < 1"),
    ({"train.lora.dropout": -0.1}, "train.lora.dropout=-0.1: must be >= 0"),
    ({"train.lora.target_modules": []}, "train.lora.target_modules=[]: must have at least 1 item(s)"),
    ({"train.num_threads": 0}, "train.num_threads=0: must be >= 1"),
    ({"train.save_steps": 0}, "train.save_steps=0: must be >= 1"),
    ({"train.seed": -1}, "train.seed=-1: must be >= 0"),
    ({"evaluate.batch_size": 0}, "evaluate.batch_size=0: must be >= 1"),
    ({"generate.teacher.n": 0}, "generate.teacher.n=0: must be >= 1"),
    ({"generate.teacher.temperature": -0.5}, "generate.teacher.temperature=-0.5: must be >= 0"),
    ({"generate.teacher.top_p": 0}, "generate.teacher.top_p=0: must be > 0"),
    ({"generate.teacher.top_p": 1.5}, "generate.teacher.top_p=1.5: must be <= 1"),
    ({"generate.teacher.max_new_tokens": 0}, "generate.teacher.max_new_tokens=0: must be >= 1"),
    ({"generate.teacher.timeout_s": 0}, "generate.teacher.timeout_s=0: must be > 0"),
    ({"generate.teacher.max_retries": -1}, "generate.teacher.max_retries=-1: must be >= 0"),
    ({"generate.teacher.concurrency": 0}, "generate.teacher.concurrency=0: must be >= 1"),
    ({"generate.shard_size": 0}, "generate.shard_size=0: must be >= 1"),
    ({"generate.limit": 0}, "generate.limit=0: must be >= 1"),
    ({"generate.workers": 0}, "generate.workers=0: must be >= 1"),
    ({"generate.max_error_rate": 1.5}, "generate.max_error_rate=1.5: must be <= 1"),
    ({"filter.max_completion_tokens": 0}, "filter.max_completion_tokens=0: must be >= 1"),
    ({"filter.workers": -1}, "filter.workers=-1: must be >= 0"),
    ({"rewrite.natural_ratio": -1}, "rewrite.natural_ratio=-1: must be >= 0"),
    ({"unify.svamp_holdout": -1}, "unify.svamp_holdout=-1: must be >= 0"),
    ({"unify.max_train_per_source": 0}, "unify.max_train_per_source=0: must be >= 1"),
    ({"unify.sources": []}, "unify.sources=[]: must have at least 1 item(s)"),
    ({"retries": -1}, "retries=-1: must be >= 0"),
    # wrong types, and a backend without the setting it needs
    ({"train.learning_rate": "fast"}, "train.learning_rate='fast': must be a valid number"),
    ({"train.lora.target_modules": 5}, "train.lora.target_modules=5: must be a valid list or a valid string"),
    (
        {"generate.teacher.backend": "openai"},
        "generate.teacher.base_url=None: required by backend 'openai'",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD, ids=[next(iter(o)) for o, _ in BAD])
def test_bad_setting_is_one_line_naming_the_setting(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(SettingError) as exc:
        load_profile("tiny", overrides)
    message = str(exc.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_every_bad_setting_is_named_in_the_same_line() -> None:
    with pytest.raises(SettingError) as exc:
        load_profile("demo", {"train.learning_rate": 0, "evaluate.max_new_tokens": 0})
    assert str(exc.value) == "train.learning_rate=0: must be > 0; evaluate.max_new_tokens=0: must be >= 1"


@pytest.mark.parametrize(
    "overrides",
    [
        {"evaluate.per_stratum": None, "generate.limit": None},  # None means "all"
        {"train.max_steps": -1, "train.epochs": 0.5},  # -1 means "train for epochs"
        {"train.max_steps": 3, "train.epochs": 0},  # steps given: epochs unused
        {"generate.teacher.temperature": 0, "generate.teacher.top_p": 1, "train.lora.dropout": 0},
        {"generate.max_error_rate": 0, "train.warmup_ratio": 0, "filter.workers": 0},
        {"train.lora.target_modules": ["q_proj", "v_proj"]},
    ],
)
def test_edge_values_that_work_are_accepted(overrides: dict[str, Any]) -> None:
    cfg = load_profile("tiny", overrides)
    assert cfg.model_dump(mode="json") == load_profile("tiny", overrides).model_dump(mode="json")


@pytest.mark.parametrize("name", PROFILES)
def test_shipped_profiles_are_in_range(name: str) -> None:
    assert load_profile(name).profile == name


def test_glyph_run_with_a_bad_setting_exits_with_one_error_line(tmp_path: Path) -> None:
    """The issue's end-to-end probe: checked before Prefect or any stage starts."""
    from glyph_cli.main import app

    res = CliRunner().invoke(
        app,
        [
            "run",
            "--profile",
            "tiny",
            "--store",
            str(tmp_path / "store"),
            "--no-server",
            "--set",
            "train.learning_rate=-1",
        ],  # fmt: skip
    )
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines == ["error: train.learning_rate=-1: must be > 0"], res.output
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"refresh": ["bogus"]}, "refresh=bogus: unknown stage(s); expected all or unify, generate"),
        ({"overrides": {"train.learning_rate": -1}}, "train.learning_rate=-1: must be > 0"),
    ],
)
def test_a_run_started_from_a_deployment_gets_the_same_checks(
    tmp_path: Path, parameters: dict[str, Any], expected: str
) -> None:
    """The flow checks its own parameters at its first line with the function `glyph run` calls
    before any server starts (`profiles.validate_run`): a run started from a deployment or the
    UI gets the same one-line `SettingError` before the store is touched.

    Before: `refresh` was checked after the store was opened, and as a plain `GlyphError`."""
    from flows.pipeline import pipeline

    with pytest.raises(SettingError) as exc:
        pipeline.fn(profile="tiny", store=str(tmp_path / "store"), **parameters)
    assert str(exc.value).startswith(expected)
    assert not (tmp_path / "store").exists()


def test_validate_run_returns_the_stages_to_recompute() -> None:
    from glyph_core.profiles import validate_run

    plan = validate_run("tiny", {"train.max_steps": 3}, ["train"])
    assert plan.refresh == {"train", "evaluate"} and plan.cfg.train.max_steps == 3  # type: ignore[attr-defined]
