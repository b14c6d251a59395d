"""The evaluate stage: promptless glyph emergence on held-out problems.

The question is whether the tuned student *chooses* the glyph structure on its own, and more
on hard problems than on easy ones. So:

* only held-out problems (``split == "test"``, never trained on) are used, with the **latent**
  prompt, which never mentions glyphs, and greedy decoding (one deterministic answer each);
* the sample is stratified per (source, difficulty level) (:func:`sample_heldout`,
  :func:`stratum_of`), so selectivity *within* each source has problems at every level;
* each completion is scored (:func:`score_completion`) for *emergence* (any glyph), *partial*
  use (some glyphs but not a valid trace) apart from *full valid structure*
  (:func:`validate_trace` finds nothing), answer *correctness* (:func:`is_equivalent` on
  :func:`extract_answer`, not "last number"; a completion cut at the token limit without an
  explicit answer has none), *truncation*, tokens, and the original study's columns
  (:mod:`glyph_core.original_study`);
* the statistics (:mod:`glyph_core.metrics`: Wilson intervals, within-source selectivity with
  bootstrap intervals) and their rendering (:mod:`glyph_core.eval_report`) live apart, so the
  CLI, the Prefect UI and ``glyph report`` show the same thing;
* base and tuned model are scored on the *same* problems. The base model's completions have
  their own cache key (problems, base model, config) that does not involve the tuned model, so
  retraining never re-evaluates the base.

Generation goes through the teacher backends (:func:`glyph_core.teachers.make_teacher`): there
is one implementation of generation for the generate and evaluate stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from glyph_core import original_study
from glyph_core.answers import extract_answer, is_equivalent
from glyph_core.config import EvalConfig, TeacherConfig
from glyph_core.errors import ErrorBudgetExceeded, GlyphError
from glyph_core.eval_report import markdown_report, plot_png
from glyph_core.generate import error_kind
from glyph_core.glyphs import ORDER, has_any_glyph, parse_trace, validate_trace
from glyph_core.metrics import BASE_LABEL, TUNED_LABEL, aggregate, build_metrics
from glyph_core.models import check_model_dir, resolve_base_model
from glyph_core.outputs import Progress, StageOutput, StageStats, Timer, ref_of
from glyph_core.prompts import TEMPLATE_HASH, latent_messages
from glyph_core.storage import DatasetRef, ModelRef, Store, stage_key
from glyph_core.teachers import make_teacher

log = logging.getLogger(__name__)

# 2: new scoring (docs/evaluation.md), truncation, strata, within-source selectivity, original columns.
VERSION = "2"

COMPLETION_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("bucket", pa.string()),
        ("difficulty", pa.float64()),
        ("level", pa.int64()),
        ("stratum", pa.string()),
        ("gold", pa.string()),
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("truncated", pa.bool_()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("emerged", pa.bool_()),
        ("glyph_kinds", pa.int64()),
        ("partial", pa.bool_()),
        ("valid", pa.bool_()),
        ("violations", pa.list_(pa.string())),
        ("pred", pa.string()),
        ("correct", pa.bool_()),
        ("orig_bucket", pa.string()),
        ("orig_emerged", pa.bool_()),
        ("orig_valid", pa.bool_()),
        ("orig_correct", pa.bool_()),
        ("error", pa.string()),
    ]
)


@dataclass
class EvalResult:
    """Every completion with its scores, the summary table, the metrics, the Markdown report and
    the plot, and where they were written (``paths``: name → local path or store URI)."""

    completions: pa.Table
    table: pa.Table
    metrics: dict[str, Any]
    markdown: str = field(default="", repr=False)
    plot_png: bytes = field(default=b"", repr=False)
    paths: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# selection


# Sampling strata: a source and its own difficulty level, the scale within-source selectivity
# is measured on. GSM8K steps and SVAMP operators are clamped into a few levels each, so every
# stratum has problems (GSM8K test: 326 with 2 steps, 371, 297, 175, then 150 with 6 or more).
STRATUM_LEVELS: dict[str, tuple[str, int | None, int | None]] = {
    # source -> (unit, levels at or below this are one stratum, at or above this are one stratum)
    "math": ("level", None, None),
    "gsm8k": ("steps", 2, 6),
    "svamp": ("ops", None, 3),
}


def stratum_of(source: str, level: int | None) -> str:
    """``"math/level=3"``, ``"gsm8k/steps<=2"``, ``"gsm8k/steps>=6"``, ``"svamp/ops=2"``, …;
    ``"<source>/<unit>=?"`` when the level is unknown."""
    unit, low, high = STRATUM_LEVELS.get(source, ("level", None, None))
    if level is None:
        return f"{source}/{unit}=?"
    if low is not None and level <= low:
        return f"{source}/{unit}<={low}"
    if high is not None and level >= high:
        return f"{source}/{unit}>={high}"
    return f"{source}/{unit}={level}"


def sample_heldout(problems: pa.Table, cfg: EvalConfig) -> pa.Table:
    """Held-out rows; with ``per_stratum``, the same ``per_stratum`` rows per stratum
    (:func:`stratum_of`) on every machine (smallest ``sha256(seed:id)``), ordered by id."""
    missing = {"id", "source", "split", "question", "answer", "difficulty", "bucket", "level"} - set(
        problems.column_names
    )
    if missing:
        raise GlyphError(f"problems table lacks columns {sorted(missing)}")
    held = problems.filter(pc.equal(problems["split"], cfg.split))
    rows = held.to_pylist()
    if cfg.per_stratum is not None:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(stratum_of(r["source"], r["level"]), []).append(r)
        rows = []
        for key in sorted(groups):
            ranked = sorted(
                groups[key], key=lambda r: hashlib.sha256(f"{cfg.seed}:{r['id']}".encode()).hexdigest()
            )
            rows.extend(ranked[: cfg.per_stratum])
    rows.sort(key=lambda r: r["id"])
    if not rows:
        raise GlyphError(
            f"empty evaluation set: no problems with split == {cfg.split!r}"
            + (f" (per_stratum={cfg.per_stratum})" if cfg.per_stratum is not None else "")
        )
    return pa.Table.from_pylist(rows, schema=held.schema)


# ---------------------------------------------------------------------------------------------
# scoring


def score_completion(text: str, gold: str, finish_reason: str | None = None) -> dict[str, Any]:
    """Glyph emergence, structure and correctness of one completion.

    ``finish_reason == "length"`` (cut at the token limit) is recorded as ``truncated``; such a
    completion only has a prediction when it states one explicitly (🝞, ``\\boxed{}``, "the
    answer is"), never a number picked out of its unfinished reasoning.
    """
    trace = parse_trace(text)
    emerged = has_any_glyph(text)
    violations = [str(v) for v in validate_trace(trace)] if emerged else []
    valid = emerged and not violations
    truncated = finish_reason == "length"
    pred = extract_answer(text, truncated=truncated)
    return {
        "emerged": emerged,
        "glyph_kinds": sum(1 for g in ORDER if g in trace.glyphs_used),
        "partial": emerged and not valid,
        "valid": valid,
        "violations": violations,
        "truncated": truncated,
        "pred": pred,
        "correct": bool(pred is not None and is_equivalent(pred, gold)),
    }


# ---------------------------------------------------------------------------------------------
# models and generation


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GlyphError(f"{path}: unreadable ({exc})") from None


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return str(Path(resolve_base_model(a)).resolve()) == str(Path(resolve_base_model(b)).resolve())
    except GlyphError:
        return False


def check_tuned_model(model_dir: str | Path, base_model: str) -> Path:
    """A tuned model directory that has weights and belongs to ``base_model``.

    An adapter's ``base_model_name_or_path`` must name (or resolve to) the configured base: an
    adapter trained on another base would load with shape errors at best, or silently evaluate
    the wrong pairing at worst. A train-stage manifest naming the base is accepted too, because
    after a move the adapter's recorded local path may not exist on this host.
    """
    path = check_model_dir(model_dir)
    manifest = path / "manifest.json"
    recorded = _read_json(manifest).get("base_model") if manifest.exists() else None
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.exists():
        adapter_base = _read_json(adapter_cfg).get("base_model_name_or_path")
        if not adapter_base:
            raise GlyphError(f"{adapter_cfg} does not name its base model")
        if not (_same_model(adapter_base, base_model) or (recorded and _same_model(recorded, base_model))):
            raise GlyphError(
                f"adapter {path} was trained on {adapter_base!r}, not on the configured base model {base_model!r}"
            )
    elif recorded and not _same_model(recorded, base_model):
        raise GlyphError(f"model {path} was fine-tuned from {recorded!r}, not from {base_model!r}")
    return path


def teacher_config(model: str, cfg: EvalConfig, adapters: list[str] | None = None) -> TeacherConfig:
    """Greedy, latent prompt, one sample: the evaluation's decoding, in teacher terms."""
    return TeacherConfig(
        backend=cfg.backend,
        model=model,
        prompt="latent",
        n=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        vllm=cfg.vllm,
        adapters=adapters or [],
    )


class EvalModels:
    """The teacher(s) one evaluation generates with, built on first use and closed on exit.

    A tuned LoRA adapter is served by the base model's teacher (`adapters=[dir]`): one vLLM
    engine with `enable_lora` answers base requests without and tuned requests with the
    adapter, and the transformers backend loads the base once. A merged or full tuned model is
    a model of its own: the base's teacher is closed (its GPU memory released) before the tuned
    model's is built, so there is never a second engine in the process.
    """

    def __init__(self, cfg: EvalConfig, base_path: str, tuned_path: str | None = None) -> None:
        self.cfg = cfg
        self.base_path = base_path
        self.adapter = (
            tuned_path if tuned_path and (Path(tuned_path) / "adapter_config.json").is_file() else None
        )
        self._teacher: Any = None
        self._serves: str | None = None  # the model path the open teacher was built on

    def teacher_for(self, model: str) -> tuple[Any, str | None]:
        """The teacher that serves ``model`` (the base or the tuned path) and the adapter to ask for."""
        on_base = model == self.base_path or model == self.adapter
        owner = self.base_path if on_base else model
        if self._teacher is not None and self._serves != owner:
            self.close()
        if self._teacher is None:
            adapters = [self.adapter] if on_base and self.adapter else []
            self._teacher = make_teacher(teacher_config(owner, self.cfg, adapters))
            self._serves = owner
        return self._teacher, (model if on_base and model == self.adapter else None)

    def close(self) -> None:
        teacher, self._teacher, self._serves = self._teacher, None, None
        if teacher is not None:
            teacher.close()

    def __enter__(self) -> EvalModels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate_completions(
    problems: pa.Table, model: str, label: str, cfg: EvalConfig, models: EvalModels | None = None
) -> pa.Table:
    """Generate one greedy completion per problem with ``model`` and score it; ``models`` is
    the evaluation's shared teacher (a one-off one is built and closed without it)."""
    from glyph_core.teachers.base import GenRequest

    if models is None:
        with EvalModels(cfg, model) as own:
            return generate_completions(problems, model, label, cfg, own)
    rows = problems.to_pylist()
    requests = [GenRequest(id=r["id"], messages=latent_messages(r["question"]), problem=r) for r in rows]
    teacher, adapter = models.teacher_for(model)
    # Batch by batch so a long CPU evaluation shows progress in the run log (one line a batch).
    size = max(1, cfg.batch_size)
    outputs: list[Any] = []
    t0 = time.perf_counter()
    log.info("evaluate %s: %d problems, up to %d new tokens each", label, len(requests), cfg.max_new_tokens)
    for start in range(0, len(requests), size):
        outputs.extend(teacher.generate(requests[start : start + size], n=1, adapter=adapter))
        tokens = sum(o.completion_tokens or 0 for outs in outputs for o in outs[:1])
        elapsed = time.perf_counter() - t0
        log.info(
            "evaluate %s: %d/%d done, %.0fs, %.1f tok/s",
            label,
            len(outputs),
            len(requests),
            elapsed,
            tokens / elapsed if elapsed else 0.0,
        )
    scored = score_rows(rows, [outs[0] for outs in outputs], label)
    check_error_budget(scored, label, model, cfg)
    return scored


def check_error_budget(scored: pa.Table, label: str, model: str, cfg: EvalConfig) -> None:
    """Fail closed: when more than `cfg.max_error_rate` of one model's completions are errors (a
    broken model, a backend that cannot run it), the scores would be a believable 0 %, so the
    stage fails before anything is published or cached. Fewer errors are counted in the
    stage's stats and their completions are not cached, so a rerun asks again."""
    failed = scored.filter(pc.equal(scored["finish_reason"], "error"))
    if failed.num_rows <= cfg.max_error_rate * scored.num_rows:
        return
    kinds = Counter(error_kind(e) for e in failed["error"].to_pylist())
    first = next((e for e in failed["error"].to_pylist() if e), "unknown")
    raise ErrorBudgetExceeded(
        f"evaluate: {failed.num_rows} of {scored.num_rows} completions of the {label} model failed "
        f"({', '.join(f'{k} x{v}' for k, v in kinds.most_common())}), more than "
        f"evaluate.max_error_rate={cfg.max_error_rate:g} allows; model {model} on backend {cfg.backend}; "
        f"first error: {first[:200]}. Nothing was published: fix the model or the backend and rerun"
    )


def score_rows(rows: list[dict[str, Any]], completions: list[Any], label: str) -> pa.Table:
    """Score ``completions`` (teacher :class:`Completion` objects) against problem ``rows``."""
    out = []
    for r, c in zip(rows, completions, strict=True):
        text = c.text or ""
        level = r.get("level")  # optional in hand-made rows: then no stratum, no within-source AUROC
        out.append(
            {
                "model": label,
                "id": r["id"],
                "source": r["source"],
                "bucket": r["bucket"],
                "difficulty": float(r["difficulty"]),
                "level": level,
                "stratum": stratum_of(r["source"], level) if level is not None else None,
                "gold": r["answer"],
                "completion": text,
                "finish_reason": c.finish_reason,
                "prompt_tokens": int(c.prompt_tokens),
                "completion_tokens": int(c.completion_tokens),
                **score_completion(text, r["answer"], c.finish_reason),
                **original_study.score(text, r.get("question"), r["answer"]),
                "error": c.error,
            }
        )
    return pa.Table.from_pylist(out, schema=COMPLETION_SCHEMA)


def report(scored: pa.Table, extra: dict[str, Any] | None = None) -> EvalResult:
    """Table, metrics, Markdown report and plot of scored completions."""
    table = aggregate(scored)
    metrics = build_metrics(scored, table, extra, version=VERSION)
    return EvalResult(
        completions=scored,
        table=table,
        metrics=metrics,
        markdown=markdown_report(metrics),
        plot_png=plot_png(metrics),
    )


def _write_local(result: EvalResult, out_dir: Path) -> None:
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "completions": out_dir / "completions.parquet",
        "table": out_dir / "table.parquet",
        "table_md": out_dir / "table.md",
        "metrics": out_dir / "metrics.json",
        "plot": out_dir / "emergence_accuracy.png",
    }
    pq.write_table(result.completions, paths["completions"])
    pq.write_table(result.table, paths["table"])
    paths["table_md"].write_text(result.markdown)
    paths["metrics"].write_text(json.dumps(result.metrics, indent=2, default=str))
    paths["plot"].write_bytes(result.plot_png)
    result.paths = {k: str(v) for k, v in paths.items()}


def evaluate(
    problems: pa.Table,
    cfg: EvalConfig,
    out_dir: str | Path,
    *,
    base_model: str,
    model: str | Path | None = None,
) -> EvalResult:
    """Evaluate ``model`` (a tuned model or adapter dir) and, if ``cfg.compare_base`` or no tuned
    model is given, ``base_model`` on the same held-out problems; write the outputs to ``out_dir``.

    All input checks (empty set, missing weights, adapter for another base) run before any
    model is loaded.
    """
    selected = sample_heldout(problems, cfg)
    tuned_path = str(check_tuned_model(model, base_model)) if model is not None else None
    base_path = resolve_base_model(base_model)
    parts = []
    with EvalModels(cfg, base_path, tuned_path) as models:
        if tuned_path is None or cfg.compare_base:
            parts.append(generate_completions(selected, base_path, BASE_LABEL, cfg, models))
        if tuned_path is not None:
            parts.append(generate_completions(selected, tuned_path, TUNED_LABEL, cfg, models))
    extra = {
        "n_problems": selected.num_rows,
        "base_model": base_model,
        "tuned_model": tuned_path,
        "config": cfg.model_dump(mode="json"),
        "prompt_hash": TEMPLATE_HASH,
    }
    result = report(pa.concat_tables(parts), extra)
    _write_local(result, Path(out_dir))
    return result


# ---------------------------------------------------------------------------------------------
# the stage (declared in glyph_core/stages.py)


def _base_key(problems_ref: DatasetRef, base_model: str, cfg: EvalConfig) -> str:
    config = {k: v for k, v in cfg.key_dump().items() if k != "compare_base"}
    return stage_key(
        "evaluate-base",
        VERSION,
        {"problems": problems_ref.sha256, "model": base_model, "prompts": TEMPLATE_HASH},
        config,
    )


def key(cfg: EvalConfig, *, problems: DatasetRef, model: ModelRef) -> str:
    return stage_key(
        "evaluate",
        VERSION,
        {"problems": problems.sha256, "model": model.sha256, "prompts": TEMPLATE_HASH},
        cfg.key_dump(),
    )


def _cached_completions(store: Store, key: str, compute: Any) -> pa.Table:
    """Completions under ``evaluate/{key}``; the ref JSON is written after the table, so its
    presence means the table is complete."""
    ref_uri = store.uri("evaluate", key, "completions.ref.json")
    if store.exists(ref_uri):
        return store.read_table(DatasetRef(**store.read_json(ref_uri)))
    table = compute()
    if pc.any(pc.equal(table["finish_reason"], "error")).as_py():
        return table  # a failed request is not a result: do not cache it, a rerun retries it
    ref = store.write_table(table, "evaluate", key, "completions.parquet")
    store.write_json(ref.model_dump(), "evaluate", key, "completions.ref.json")
    return table


def evaluate_refs(
    store: Store,
    problems_ref: DatasetRef,
    model_ref: ModelRef,
    cfg: EvalConfig,
    cache_dir: str | Path | None = None,
) -> EvalResult:
    """The evaluate stage on stored artifacts: outputs under ``evaluate/{key}/``.

    The base model's completions are cached under their own key, so they are reused across
    re-trained models; a ``ModelRef`` of kind ``base`` evaluates the base model alone.
    """
    problems = store.read_table(problems_ref)
    selected = sample_heldout(problems, cfg)  # empty set fails before any download or load
    out_key = key(cfg, problems=problems_ref, model=model_ref)
    base_model = model_ref.base_model
    tuned_dir: str | None = None
    if model_ref.kind != "base":
        tuned_dir = str(check_tuned_model(store.get_dir(model_ref, cache_dir), base_model))
    parts = []
    base_path = resolve_base_model(base_model)
    with EvalModels(cfg, base_path, tuned_dir) as models:  # built only if something is not cached
        if tuned_dir is None or cfg.compare_base:
            base_key = _base_key(problems_ref, base_model, cfg)
            parts.append(
                _cached_completions(
                    store,
                    base_key,
                    lambda: generate_completions(selected, base_path, BASE_LABEL, cfg, models),
                )
            )
        if tuned_dir is not None:
            tuned = tuned_dir
            parts.append(
                _cached_completions(
                    store, out_key, lambda: generate_completions(selected, tuned, TUNED_LABEL, cfg, models)
                )
            )
    extra = {
        "n_problems": selected.num_rows,
        "base_model": base_model,
        "model_ref": model_ref.model_dump(),
        "problems_sha256": problems_ref.sha256,
        "config": cfg.model_dump(mode="json"),
        "prompt_hash": TEMPLATE_HASH,
    }
    result = report(pa.concat_tables(parts), extra)
    scored_ref = store.write_table(result.completions, "evaluate", out_key, "scored.parquet")
    table_ref = store.write_table(result.table, "evaluate", out_key, "table.parquet")
    store.publish_bytes(store.uri("evaluate", out_key, "table.md"), result.markdown.encode())
    store.publish_bytes(store.uri("evaluate", out_key, "emergence_accuracy.png"), result.plot_png)
    metrics_uri = store.write_json(result.metrics, "evaluate", out_key, "metrics.json")
    result.paths = {
        "completions": scored_ref.uri,
        "table": table_ref.uri,
        "table_md": store.uri("evaluate", out_key, "table.md"),
        "plot": store.uri("evaluate", out_key, "emergence_accuracy.png"),
        "metrics": metrics_uri,
    }
    return result


def run(
    store: Store,
    cfg: EvalConfig,
    *,
    problems: DatasetRef,
    model: ModelRef,
    progress: Progress | None = None,
) -> StageOutput:
    """Base against tuned on the held-out problems: emergence, structure, accuracy, selectivity.

    `progress` is accepted like every stage's and not called yet (generation reports per batch
    in the log)."""
    timer = Timer()
    result = evaluate_refs(store, problems, model, cfg)
    refs: dict[str, DatasetRef | ModelRef] = {
        "table": ref_of(store, result.paths["table"]),
        "completions": ref_of(store, result.paths["completions"]),
    }
    extra: dict[str, Any] = {k: v for k, v in result.paths.items() if k not in ("table", "completions")}
    for name, value in result.metrics.items():
        if isinstance(value, int | float | str) and len(extra) < 40:
            extra[name] = value
    return StageOutput(
        stage="evaluate",
        key=key(cfg, problems=problems, model=model),
        refs=refs,
        stats=StageStats(
            rows_in=problems.rows,
            rows_out=result.completions.num_rows,
            errors=int(pc.sum(pc.equal(result.completions["finish_reason"], "error")).as_py() or 0),
            seconds=timer.seconds,
            extra=extra,
        ),
    )
