"""The stages, declared once, in order (docs/design.md, "Stages and their contracts").

Each `Stage` names its config model, the refs it reads (`inputs`: names of earlier stages'
`outputs`), the refs it writes, its runner and its key function, and whether it runs on the GPU
pool. Everything else is derived from these declarations:

- the Prefect task of each stage (`tasks.stages.task_for`), its cache key and its artifacts;
- the pipeline's wiring (`flows.pipeline`: each stage gets the refs its `inputs` name);
- the GPU child flows (`flows.gpu_stages`), their parameters taken from the runner's signature;
- the pipeline config (`glyph_core.profiles.PipelineConfig`: one field per stage);
- the `glyph <stage>` commands and their options (`glyph_cli.stage_commands`).

A stage module exposes two functions, both knowing nothing of how they are launched (like the
`main(config)` of TRL's scripts):

    run(store, cfg, *, <one keyword per input ref>, progress=None) -> StageOutput
    key(cfg, *, <one keyword per input ref>) -> str

`key` is the content key of the stage (`storage.stage_key`: stage name, an explicit version,
the sha256 of every input, the config's `key_dump()`); `run` writes its artifacts under
`{store}/{stage}/{key}/` and must return exactly the refs `outputs` names. The Prefect cache
policy calls the same `key`, so a cache hit names the artifact written under the same key.

Adding a stage: its module (`run`, `key`), its config class, and one `register(Stage(...))`
below. `register` checks the wiring once, when the stage is declared.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from glyph_core import evaluate, generate, rewrite, train, unify
from glyph_core import filter as filter_stage
from glyph_core.config import (
    EvalConfig,
    FilterConfig,
    GenerateConfig,
    RewriteConfig,
    StrictModel,
    TrainConfig,
    UnifyConfig,
)
from glyph_core.errors import GlyphError, SettingError
from glyph_core.outputs import StageOutput
from glyph_core.reports import StageReport, evaluation_report, training_report

Runner = Callable[..., StageOutput]
KeyFn = Callable[..., str]
ReportFn = Callable[[Any, StageOutput], StageReport]

RESERVED: frozenset[str] = frozenset({"all", "profile", "gpu_pool", "retries", "retry_delay_s"})
"""Names no stage may take: `refresh=["all"]`, and the pipeline config's own fields."""


@dataclass(frozen=True)
class FanOut:
    """A stage whose work splits into groups that several workers do at once, before one final
    pass of the stage itself finds every group's work done and only assembles the output.

    `workers_field` names the config field with the number of workers; it must stay out of the
    key (`NOT_IN_KEY`), because the final pass runs with it set to 1 and must hit the same key.
    `run_group(store, cfg, *, worker, workers, <input refs>) -> dict` does one group's part and
    returns JSON-able counts (summed into the stage's stats).
    """

    workers_field: str
    run_group: Callable[..., dict[str, Any]]

    def workers(self, cfg: StrictModel) -> int:
        return int(getattr(cfg, self.workers_field))

    def final_pass(self, cfg: StrictModel) -> StrictModel:
        return cfg.model_copy(update={self.workers_field: 1})


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[StrictModel]
    inputs: tuple[str, ...]
    """Refs it reads: names of earlier stages' outputs, passed to `run` and `key` as keywords."""
    outputs: tuple[str, ...]
    """Refs it writes, the main one first."""
    run: Runner
    key: KeyFn
    gpu: bool = False
    """Runs on the GPU pool when one is configured (docs/design.md, "GPU stages")."""
    help: str = ""
    fan_out: FanOut | None = None
    report: ReportFn | None = None
    """`report(store, output) -> StageReport`: what a person reads of the result (log lines, a
    section of the stage's artifact, keyed documents such as `glyph-evaluation`), rendered from
    what the stage left in the store (glyph_core.reports.py)."""

    def key_for(self, cfg: StrictModel, refs: dict[str, Any]) -> str:
        """The stage's key for this config and these refs (only the declared inputs count)."""
        return self.key(cfg, **{name: refs[name] for name in self.inputs})

    def run_with(
        self, store: Any, cfg: StrictModel, refs: dict[str, Any], progress: Any = None
    ) -> StageOutput:
        """Run the stage on the declared inputs; fail closed on outputs it did not declare."""
        out = self.run(store, cfg, progress=progress, **{name: refs[name] for name in self.inputs})
        if tuple(out.refs) != self.outputs:
            raise GlyphError(
                f"stage {self.name} returned refs {list(out.refs)}, declared {list(self.outputs)}"
            )
        return out


_REGISTRY: dict[str, Stage] = {}


def _check(stage: Stage, earlier: list[Stage]) -> None:
    """The declaration's wiring, checked once: names, inputs produced earlier, signatures."""
    where = f"stage {stage.name!r}"
    if not re.fullmatch(r"[a-z][a-z0-9_]*", stage.name) or stage.name in RESERVED:
        raise GlyphError(f"{where}: a stage name is lower-case letters, digits and _, not {sorted(RESERVED)}")
    if any(s.name == stage.name for s in earlier):
        raise GlyphError(f"{where} is declared twice")
    if not (isinstance(stage.config, type) and issubclass(stage.config, StrictModel)):
        raise GlyphError(f"{where}: its config must be a StrictModel subclass")
    produced = {name: s.name for s in earlier for name in s.outputs}
    if not stage.outputs or len(set(stage.outputs)) != len(stage.outputs):
        raise GlyphError(f"{where}: outputs must be non-empty and distinct")
    for name in stage.outputs:
        if name in produced:
            raise GlyphError(f"{where}: output {name!r} is already produced by stage {produced[name]!r}")
    for name in stage.inputs:
        if name not in produced:
            raise GlyphError(
                f"{where}: input {name!r} is no earlier stage's output (have: {', '.join(produced) or 'none'})"
            )
    for fn, needed in (
        (stage.run, {"store", "cfg", "progress", *stage.inputs}),
        (stage.key, {"cfg", *stage.inputs}),
    ):
        params = inspect.signature(fn).parameters
        missing = needed - set(params)
        if missing:
            raise GlyphError(f"{where}: {fn.__module__}.{fn.__name__} lacks parameter(s) {sorted(missing)}")
    if stage.fan_out is not None:
        field = stage.config.model_fields.get(stage.fan_out.workers_field)
        extra = field.json_schema_extra if field is not None else None
        if not (isinstance(extra, dict) and extra.get("cache_key") is False):
            raise GlyphError(
                f"{where}: fan-out field {stage.fan_out.workers_field!r} must be a config field kept out of the key"
            )


def register(stage: Stage) -> Stage:
    """Declare a stage after the ones already declared (its inputs must be their outputs)."""
    _check(stage, list(_REGISTRY.values()))
    _REGISTRY[stage.name] = stage
    return stage


@contextmanager
def registered(stage: Stage) -> Iterator[Stage]:
    """`stage` declared for the duration of the block (tests and experiments)."""
    register(stage)
    try:
        yield stage
    finally:
        _REGISTRY.pop(stage.name, None)


def stages() -> tuple[Stage, ...]:
    """Every declared stage, in pipeline order."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def refresh_set(refresh: Iterable[str] | None) -> set[str]:
    """The stages a `refresh` list recomputes: the named ones and every stage after the
    earliest of them (a refreshed stage's consumers should see the rerun); `all` is every stage.
    An unknown name is a `SettingError` naming the choices."""
    order = names()
    chosen = [r.strip() for r in (refresh or []) if r.strip()]
    if not chosen:
        return set()
    if "all" in chosen:
        return set(order)
    unknown = [n for n in chosen if n not in order]
    if unknown:
        raise SettingError(
            f"refresh={','.join(unknown)}: unknown stage(s); expected all or {', '.join(order)}"
        )
    first = min(order.index(n) for n in chosen)
    return set(order[first:])


def get(name: str) -> Stage:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise GlyphError(f"unknown stage {name!r}; expected one of {', '.join(_REGISTRY)}") from None


# ---------------------------------------------------------------------------------------------
# the declarations

register(
    Stage(
        name="unify",
        config=UnifyConfig,
        inputs=(),
        outputs=("problems",),
        run=unify.run,
        key=unify.key,
        help="GSM8K, SVAMP and MATH -> one problems table with splits, difficulty and buckets.",
    )
)
register(
    Stage(
        name="generate",
        config=GenerateConfig,
        inputs=("problems",),
        outputs=("traces",),
        run=generate.run,
        key=generate.key,
        gpu=True,
        help="A teacher writes traces for the training problems (sharded, resumable).",
        fan_out=FanOut(workers_field="workers", run_group=generate.run_group),
    )
)
register(
    Stage(
        name="filter",
        config=FilterConfig,
        inputs=("traces", "problems"),
        outputs=("kept", "drops"),
        run=filter_stage.run,
        key=filter_stage.key,
        help="Keep complete, well-formed, correct, distinct traces; count drops by reason.",
    )
)
register(
    Stage(
        name="rewrite",
        config=RewriteConfig,
        inputs=("kept", "problems"),
        outputs=("sft",),
        run=rewrite.run,
        key=rewrite.key,
        help="SFT chat rows: latent prompt -> glyph trace (hard) or natural answer (easy).",
    )
)
register(
    Stage(
        name="train",
        config=TrainConfig,
        inputs=("sft",),
        outputs=("model", "metrics"),
        run=train.run,
        key=train.key,
        gpu=True,
        help="Fine-tune the student on the SFT rows (LoRA by default); reruns resume.",
        report=training_report,
    )
)
register(
    Stage(
        name="evaluate",
        config=EvalConfig,
        inputs=("problems", "model"),
        outputs=("table", "completions"),
        run=evaluate.run,
        key=evaluate.key,
        gpu=True,
        help="Promptless evaluation of base and tuned model on held-out problems.",
        report=evaluation_report,
    )
)
