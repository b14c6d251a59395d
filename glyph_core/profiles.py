"""Pipeline profiles (`tiny`, `demo`, `full`) and `--set key=value` overrides.

A profile is a complete `PipelineConfig`: one pydantic model holding every stage's config, so
an override such as `generate.teacher.temperature=0.2` is validated by the same model that the
stage later hashes into its cache key, and a typo fails before anything runs (`extra="forbid"`).

- `tiny`: the tests' profile. A tiny random llama (alias `tiny-random`), a few problems per
  source from the local data, the reference teacher (no model needed to generate), two train
  steps, a few evaluation problems. Seconds per stage on a 2-core CPU.
- `demo`: SmolLM2-135M-Instruct (alias `smollm2-135m`) on the real local data (the Hub when
  `../shared/data` is absent), sized by measurement for ~4 minutes of pipeline on 2 CPU cores
  (README.md, "The demo"): 19 SFT rows × 3 epochs of LoRA, 11 held-out problems (one per source and
  difficulty level), base vs tuned.
- `full`: Hub data at pinned revisions, Qwen2.5-7B-Instruct as teacher and student, vLLM.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import Field, ValidationError, create_model

from glyph_core.config import (
    NOT_IN_KEY,
    EvalConfig,
    FilterConfig,
    GenerateConfig,
    LoraConfig,
    RewriteConfig,
    StrictModel,
    TeacherConfig,
    TrainConfig,
    UnifyConfig,
    invalid_settings,
)
from glyph_core.errors import GlyphError
from glyph_core.stages import Stage, refresh_set, stages

PROFILES: tuple[str, ...] = ("tiny", "demo", "full")


class PipelineConfig(StrictModel):
    """Everything one pipeline run needs besides the store: one field per declared stage, named
    after it and holding its config (added by `pipeline_config_model` from the declarations in
    glyph_core/stages.py), and the fields below, which steer how the flow runs, not what it
    computes. Stage configs are hashed into their own stage's key only."""

    profile: str = "custom"
    # Orchestration only (never part of a stage key).
    gpu_pool: str | None = Field(
        default=None,
        json_schema_extra=NOT_IN_KEY,
        description='GPU deployment for generate/train/evaluate: None lets $GLYPH_GPU_DEPLOYMENT decide, "inline" forces inline',
    )
    retries: int = Field(
        default=2, ge=0, json_schema_extra=NOT_IN_KEY, description="task retries on transient errors"
    )
    retry_delay_s: float = Field(
        default=2.0, ge=0, json_schema_extra=NOT_IN_KEY, description="first backoff delay"
    )

    def stage_config(self, name: str) -> StrictModel:
        """The config of stage `name`."""
        value = getattr(self, name)
        if not isinstance(value, StrictModel):
            raise GlyphError(f"{name!r} is not a stage of this pipeline config")
        return value


@functools.cache
def _model_for(declared: tuple[Stage, ...]) -> type[PipelineConfig]:
    # `register` keeps stage names out of RESERVED, which lists this model's own fields.
    fields: dict[str, Any] = {
        s.name: (s.config, Field(default_factory=s.config, description=s.help)) for s in declared
    }
    return create_model("PipelineConfig", __base__=PipelineConfig, **fields)


def pipeline_config_model() -> type[PipelineConfig]:
    """`PipelineConfig` with one field per declared stage (built once per set of stages)."""
    return _model_for(stages())


def _build(**fields: Any) -> PipelineConfig:
    return pipeline_config_model().model_validate(fields)


def default_store_root() -> str:
    """`$GLYPH_STORE`, else `./.glyph/store` (git-ignored): embedded, nothing to start."""
    return os.environ.get("GLYPH_STORE") or str(Path(".glyph") / "store")


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_data_dir() -> str:
    """`$GLYPH_DATA_DIR`, else `../shared/data` beside the repository (the data is never copied in)."""
    env = os.environ.get("GLYPH_DATA_DIR")
    if env:
        return str(Path(env).expanduser())
    return str((repo_root().parent / "shared" / "data").resolve())


def local_data_dir_or_hub() -> str | None:
    """The local data folder when it exists, else None (the Hub), for the demo: a newcomer
    without `../shared/data` still gets a run (scripts/demo.sh says which one it uses)."""
    path = default_data_dir()
    return path if Path(path).is_dir() else None


def _tiny() -> PipelineConfig:
    return _build(
        profile="tiny",
        unify=UnifyConfig(
            data_dir=default_data_dir(), max_train_per_source=4, max_test_per_source=2, svamp_holdout=300
        ),
        generate=GenerateConfig(
            teacher=TeacherConfig(backend="reference", model="reference", n=1, max_new_tokens=256),
            shard_size=4,
        ),
        filter=FilterConfig(max_completion_tokens=1024, workers=1),
        rewrite=RewriteConfig(glyph_min_bucket="easy", natural_ratio=1.0),  # every kept trace trains
        train=TrainConfig(
            base_model="tiny-random",
            method="lora",
            max_steps=2,
            batch_size=2,
            grad_accum=1,
            max_seq_len=256,
            bf16="off",
            device="cpu",
            save_steps=1000,
        ),
        evaluate=EvalConfig(per_stratum=1, max_new_tokens=16, batch_size=8, compare_base=True),
        retries=1,
        retry_delay_s=0.2,
    )


def _demo() -> PipelineConfig:
    """Sized for ~5 minutes of pipeline on 2 CPU cores (README.md, "The demo", has the measurements).

    Why these numbers: CPU LoRA on SmolLM2-135M runs at ~150 tokens/s with 2 threads at batch 1,
    so training gets a budget of ~15k tokens: 12 problems per source → ~17 SFT rows, truncated
    at 384 tokens, 3 epochs. Emergence needs a strong signal (a GPU run with 2e-4 and 120 rows
    showed none; 1e-3 and 1,068 rows × 6 epochs did), so a high learning rate and glyph rows for
    medium and hard problems. Evaluation is the other big cost (two models generate): one problem
    per (source, difficulty level) stratum, 11 of the 24 held-out problems (all five MATH levels),
    128 new tokens, which is enough to see whether a completion *starts* with the glyph structure
    but often too short for a complete, valid trace (the report's truncation warning says so).
    """
    return _build(
        profile="demo",
        unify=UnifyConfig(data_dir=local_data_dir_or_hub(), max_train_per_source=12, max_test_per_source=8),
        generate=GenerateConfig(
            teacher=TeacherConfig(backend="reference", model="reference", n=1, max_new_tokens=384),
            shard_size=16,
        ),
        filter=FilterConfig(),
        rewrite=RewriteConfig(glyph_min_bucket="medium", natural_ratio=0.5),
        train=TrainConfig(
            base_model="smollm2-135m",
            method="lora",
            lora=LoraConfig(r=16, alpha=32, dropout=0.0),
            epochs=3.0,
            max_steps=-1,
            learning_rate=2e-3,
            batch_size=1,
            grad_accum=1,
            max_seq_len=384,
            bf16="off",
            device="cpu",
            num_threads=2,
            logging_steps=5,
            save_steps=25,
        ),
        evaluate=EvalConfig(per_stratum=1, max_new_tokens=128, batch_size=8, compare_base=True),
    )


def _full() -> PipelineConfig:
    qwen = "Qwen/Qwen2.5-7B-Instruct"
    return _build(
        profile="full",
        unify=UnifyConfig(data_dir=None),
        generate=GenerateConfig(
            teacher=TeacherConfig(
                backend="vllm", model=qwen, n=4, temperature=0.7, max_new_tokens=1024, dtype="bfloat16"
            ),
            shard_size=256,
        ),
        filter=FilterConfig(max_completion_tokens=1024),
        rewrite=RewriteConfig(),
        train=TrainConfig(
            base_model=qwen, method="lora", epochs=2.0, batch_size=4, grad_accum=4, max_seq_len=2048
        ),
        evaluate=EvalConfig(per_stratum=None, max_new_tokens=1024, backend="vllm"),
        gpu_pool=None,
    )


_BUILDERS = {"tiny": _tiny, "demo": _demo, "full": _full}


def parse_value(text: str) -> Any:
    """A `--set` value: JSON where it parses (numbers, true/false, null, lists), else the string.

    Pydantic then coerces and validates it against the field's type.
    """
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        if "," in text and not text.startswith(("{", "[")):
            return [part.strip() for part in text.split(",") if part.strip()]
        return text


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` → `{"a.b": 1, "c": "x"}`."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GlyphError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def apply_overrides(cfg: PipelineConfig, overrides: Mapping[str, Any]) -> PipelineConfig:
    """A new config with dotted-path overrides applied, validated as a whole."""
    data = cfg.model_dump(mode="json")
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise GlyphError(f"unknown setting {'.'.join(parts[: i + 1])!r} in {dotted!r}")
            if node[part] is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise GlyphError(f"unknown setting {dotted!r}")
        node[parts[-1]] = value
    try:
        return pipeline_config_model().model_validate(data)
    except ValidationError as exc:  # one line naming each dotted field and its bad value
        raise invalid_settings(exc) from exc


class RunPlan(NamedTuple):
    """A pipeline run's settings, checked: the config and the stages to recompute."""

    cfg: PipelineConfig
    refresh: set[str]


def validate_run(
    profile: str, overrides: Mapping[str, Any] | None = None, refresh: Iterable[str] | None = None
) -> RunPlan:
    """Every check a pipeline run's parameters can get before anything starts: the profile, each
    `--set` override (known, typed, in range) and each `refresh` name. `glyph run` calls it
    before a Prefect server starts, and the pipeline flow at its first line, so a run started
    from a deployment or the UI gets the same checks and the same one-line `SettingError`."""
    return RunPlan(load_profile(profile, overrides), refresh_set(refresh))


def load_profile(name: str, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    if name not in _BUILDERS:
        raise GlyphError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}")
    cfg = _BUILDERS[name]()
    return apply_overrides(cfg, overrides) if overrides else cfg
