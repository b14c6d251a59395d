"""The evaluate stage: promptless glyph emergence on held-out problems.

The question is whether the tuned student *chooses* the glyph structure on its own, and more
on hard problems than on easy ones. So:

* only held-out problems (``split == "test"``, never trained on) are used, with the **latent**
  prompt, which never mentions glyphs, and greedy decoding (one deterministic answer each);
* each completion is scored for *emergence* (any glyph), *partial* use (some glyphs but not a
  valid trace) apart from *full valid structure* (:func:`validate_trace` finds nothing), answer
  *correctness* (:func:`is_equivalent` on :func:`extract_answer`, not "last number"), and tokens;
* rates get 95 % Wilson intervals (they stay inside [0, 1] and behave at 0 % and 100 %, where
  the normal approximation collapses to a zero-width interval on small buckets);
* selectivity is emergence(hard) − emergence(easy), and the AUROC of glyph use against the
  continuous difficulty (Mann–Whitney with mid-ranks for ties): 0.5 means glyph use ignores
  difficulty, 1.0 means every glyph-using problem is harder than every other one;
* base and tuned model are scored on the *same* problems. The base model's completions have
  their own cache key (problems, base model, config) that does not involve the tuned model, so
  retraining never re-evaluates the base.

Generation goes through the teacher backends (:func:`glyph_core.teachers.make_teacher`): there
is one implementation of generation for the generate and evaluate stages.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from glyph_core.answers import extract_answer, is_equivalent
from glyph_core.config import BUCKETS, EvalConfig, TeacherConfig
from glyph_core.errors import GlyphError
from glyph_core.glyphs import ORDER, has_any_glyph, parse_trace, validate_trace
from glyph_core.models import check_model_dir, resolve_base_model
from glyph_core.outputs import Progress, StageOutput, StageStats, Timer, ref_of
from glyph_core.prompts import TEMPLATE_HASH, latent_messages
from glyph_core.storage import DatasetRef, ModelRef, Store, stage_key
from glyph_core.teachers import make_teacher

log = logging.getLogger(__name__)

VERSION = "1"
Z95 = 1.959963984540054
BASE_LABEL = "base"
TUNED_LABEL = "tuned"

COMPLETION_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("bucket", pa.string()),
        ("difficulty", pa.float64()),
        ("gold", pa.string()),
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("emerged", pa.bool_()),
        ("glyph_kinds", pa.int64()),
        ("partial", pa.bool_()),
        ("valid", pa.bool_()),
        ("violations", pa.list_(pa.string())),
        ("pred", pa.string()),
        ("correct", pa.bool_()),
        ("error", pa.string()),
    ]
)


@dataclass
class EvalResult:
    """Every completion with its scores, the summary table, the metrics, and where they were
    written (``paths``: name → local path or store URI)."""

    completions: pa.Table
    table: pa.Table
    metrics: dict[str, Any]
    plot_png: bytes = field(default=b"", repr=False)
    paths: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# selection


def select_problems(problems: pa.Table, cfg: EvalConfig) -> pa.Table:
    """Held-out rows; with ``per_bucket``, the same ``per_bucket`` rows per (source, bucket) on
    every machine (smallest ``sha256(seed:id)``), ordered by id."""
    missing = {"id", "source", "split", "question", "answer", "difficulty", "bucket"} - set(
        problems.column_names
    )
    if missing:
        raise GlyphError(f"problems table lacks columns {sorted(missing)}")
    held = problems.filter(pc.equal(problems["split"], cfg.split))
    rows = held.to_pylist()
    if cfg.per_bucket is not None:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault((r["source"], r["bucket"]), []).append(r)
        rows = []
        for key in sorted(groups):
            ranked = sorted(
                groups[key], key=lambda r: hashlib.sha256(f"{cfg.seed}:{r['id']}".encode()).hexdigest()
            )
            rows.extend(ranked[: cfg.per_bucket])
    rows.sort(key=lambda r: r["id"])
    if not rows:
        raise GlyphError(
            f"empty evaluation set: no problems with split == {cfg.split!r}"
            + (f" (per_bucket={cfg.per_bucket})" if cfg.per_bucket is not None else "")
        )
    return pa.Table.from_pylist(rows, schema=held.schema)


# ---------------------------------------------------------------------------------------------
# scoring


def score_completion(text: str, gold: str) -> dict[str, Any]:
    """Glyph emergence, structure and correctness of one completion."""
    trace = parse_trace(text)
    emerged = has_any_glyph(text)
    violations = [str(v) for v in validate_trace(trace)] if emerged else []
    valid = emerged and not violations
    pred = extract_answer(text)
    return {
        "emerged": emerged,
        "glyph_kinds": sum(1 for g in ORDER if g in trace.glyphs_used),
        "partial": emerged and not valid,
        "valid": valid,
        "violations": violations,
        "pred": pred,
        "correct": bool(pred is not None and is_equivalent(pred, gold)),
    }


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (nan, nan) when n == 0."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends, not 1 - 1e-16
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def mean_ci(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean with a normal-approximation interval (tokens are bounded; fine for n ≳ 10)."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    m = sum(values) / n
    if n == 1:
        return (m, math.nan, math.nan)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return (m, m - half, m + half)


def auroc(labels: list[bool], scores: list[float]) -> float | None:
    """P(score of a positive > score of a negative), ties counting ½ (Mann–Whitney U / n₊n₋).

    None when either class is empty: selectivity is undefined if the model always or never
    uses glyphs.
    """
    pairs = sorted(zip(scores, labels, strict=True), key=lambda p: p[0])
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # mid-ranks over runs of tied scores
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        mid = (i + j) / 2 + 1
        rank_sum += mid * sum(1 for k in range(i, j + 1) if pairs[k][1])
        i = j + 1
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


# ---------------------------------------------------------------------------------------------
# aggregation

TABLE_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("group_by", pa.string()),
        ("group", pa.string()),
        ("n", pa.int64()),
        ("emergence", pa.float64()),
        ("emergence_lo", pa.float64()),
        ("emergence_hi", pa.float64()),
        ("partial", pa.float64()),
        ("valid", pa.float64()),
        ("valid_lo", pa.float64()),
        ("valid_hi", pa.float64()),
        ("accuracy", pa.float64()),
        ("accuracy_lo", pa.float64()),
        ("accuracy_hi", pa.float64()),
        ("mean_tokens", pa.float64()),
        ("tokens_lo", pa.float64()),
        ("tokens_hi", pa.float64()),
    ]
)


def _group_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    out: dict[str, Any] = {"n": n}
    for name, col in (("emergence", "emerged"), ("valid", "valid"), ("accuracy", "correct")):
        k = sum(1 for r in rows if r[col])
        lo, hi = wilson(k, n)
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = (k / n if n else math.nan), lo, hi
    out["partial"] = sum(1 for r in rows if r["partial"]) / n if n else math.nan
    m, lo, hi = mean_ci([float(r["completion_tokens"]) for r in rows])
    out["mean_tokens"], out["tokens_lo"], out["tokens_hi"] = m, lo, hi
    return out


def _bucket_order(b: str) -> tuple[int, str]:
    return (BUCKETS.index(b) if b in BUCKETS else len(BUCKETS), b)  # type: ignore[arg-type]


def aggregate(scored: pa.Table) -> pa.Table:
    """Per model: all problems, per bucket, per source and per (source, bucket)."""
    rows = scored.to_pylist()
    models = list(dict.fromkeys(r["model"] for r in rows))
    out: list[dict[str, Any]] = []
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        out.append({"model": model, "group_by": "all", "group": "all", **_group_stats(mine)})
        for b in sorted({r["bucket"] for r in mine}, key=_bucket_order):
            sel = [r for r in mine if r["bucket"] == b]
            out.append({"model": model, "group_by": "bucket", "group": b, **_group_stats(sel)})
        for s in sorted({r["source"] for r in mine}):
            sel = [r for r in mine if r["source"] == s]
            out.append({"model": model, "group_by": "source", "group": s, **_group_stats(sel)})
        for s, b in sorted(
            {(r["source"], r["bucket"]) for r in mine}, key=lambda x: (x[0], _bucket_order(x[1]))
        ):
            sel = [r for r in mine if r["source"] == s and r["bucket"] == b]
            out.append(
                {"model": model, "group_by": "source_bucket", "group": f"{s}/{b}", **_group_stats(sel)}
            )
    return pa.Table.from_pylist(out, schema=TABLE_SCHEMA)


def selectivity(scored: pa.Table) -> dict[str, dict[str, float | None]]:
    rows = scored.to_pylist()
    out: dict[str, dict[str, float | None]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        rate = {}
        for b in ("easy", "hard"):
            sel = [r for r in mine if r["bucket"] == b]
            rate[b] = sum(r["emerged"] for r in sel) / len(sel) if sel else None
        diff = rate["hard"] - rate["easy"] if rate["hard"] is not None and rate["easy"] is not None else None
        out[model] = {
            "emergence_hard_minus_easy": diff,
            "auroc_glyph_vs_difficulty": auroc([r["emerged"] for r in mine], [r["difficulty"] for r in mine]),
            "valid_auroc_vs_difficulty": auroc([r["valid"] for r in mine], [r["difficulty"] for r in mine]),
        }
    return out


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def build_metrics(scored: pa.Table, table: pa.Table, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics JSON: per model overall / by bucket / by source, selectivity, and tuned − base."""
    sel = selectivity(scored)
    trows = table.to_pylist()
    srows = scored.to_pylist()
    models: dict[str, Any] = {}

    def stats(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k not in ("model", "group_by", "group")}

    for model in dict.fromkeys(r["model"] for r in trows):
        mine = [r for r in trows if r["model"] == model]
        reasons = [r["finish_reason"] for r in srows if r["model"] == model]
        models[model] = {
            "overall": next(stats(r) for r in mine if r["group_by"] == "all"),
            "by_bucket": {r["group"]: stats(r) for r in mine if r["group_by"] == "bucket"},
            "by_source": {r["group"]: stats(r) for r in mine if r["group_by"] == "source"},
            "selectivity": sel[model],
            "errors": reasons.count("error"),
            "truncated": reasons.count("length"),
        }
    metrics: dict[str, Any] = {"stage": "evaluate", "version": VERSION, "models": models, **(extra or {})}
    if BASE_LABEL in models and TUNED_LABEL in models:
        delta: dict[str, Any] = {}
        for b, tuned in models[TUNED_LABEL]["by_bucket"].items():
            base = models[BASE_LABEL]["by_bucket"].get(b)
            if base:
                delta[b] = {m: tuned[m] - base[m] for m in ("emergence", "valid", "accuracy", "mean_tokens")}
        metrics["tuned_minus_base"] = delta
    return _nan_to_none(metrics)


# ---------------------------------------------------------------------------------------------
# presentation


def display_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The side-by-side table: per bucket and overall, model next to model."""
    rows = [r for r in table.to_pylist() if r["group_by"] in ("bucket", "all")]
    return sorted(
        rows, key=lambda r: (_bucket_order(r["group"]) if r["group"] != "all" else (99, ""), r["model"])
    )


def _fmt_rate(p: float, lo: float, hi: float) -> str:
    if p != p:
        return "–"
    return f"{100 * p:.1f}% [{100 * lo:.0f}–{100 * hi:.0f}]"


def markdown_table(table: pa.Table) -> str:
    lines = [
        "| bucket | model | n | emergence | valid structure | accuracy | mean tokens |",
        "|---|---|---:|---|---|---|---:|",
    ]
    for r in display_rows(table):
        lines.append(
            f"| {r['group']} | {r['model']} | {r['n']} | "
            f"{_fmt_rate(r['emergence'], r['emergence_lo'], r['emergence_hi'])} | "
            f"{_fmt_rate(r['valid'], r['valid_lo'], r['valid_hi'])} | "
            f"{_fmt_rate(r['accuracy'], r['accuracy_lo'], r['accuracy_hi'])} | {r['mean_tokens']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_png(table: pa.Table) -> bytes:
    """Emergence and accuracy by bucket, one bar per model, Wilson intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table.to_pylist() if r["group_by"] == "bucket"]
    buckets = sorted({r["group"] for r in rows}, key=_bucket_order)
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    width = 0.8 / max(1, len(models))
    for ax, metric, title in ((axes[0], "emergence", "Glyph emergence"), (axes[1], "accuracy", "Accuracy")):
        for j, model in enumerate(models):
            xs, ys, err_lo, err_hi = [], [], [], []
            for i, b in enumerate(buckets):
                r = next((r for r in rows if r["model"] == model and r["group"] == b), None)
                if r is None:
                    continue
                xs.append(i + (j - (len(models) - 1) / 2) * width)
                ys.append(r[metric])
                err_lo.append(max(0.0, r[metric] - r[f"{metric}_lo"]))
                err_hi.append(max(0.0, r[f"{metric}_hi"] - r[metric]))
            ax.bar(xs, ys, width, yerr=[err_lo, err_hi], capsize=3, label=model)
        ax.set_xticks(range(len(buckets)), buckets)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.set_xlabel("difficulty bucket")
    axes[0].set_ylabel("rate (95% Wilson CI)")
    axes[1].legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


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
    return score_rows(rows, [outs[0] for outs in outputs], label)


def score_rows(rows: list[dict[str, Any]], completions: list[Any], label: str) -> pa.Table:
    """Score ``completions`` (teacher :class:`Completion` objects) against problem ``rows``."""
    out = []
    for r, c in zip(rows, completions, strict=True):
        text = c.text or ""
        scores = score_completion(text, r["answer"])
        out.append(
            {
                "model": label,
                "id": r["id"],
                "source": r["source"],
                "bucket": r["bucket"],
                "difficulty": float(r["difficulty"]),
                "gold": r["answer"],
                "completion": text,
                "finish_reason": c.finish_reason,
                "prompt_tokens": int(c.prompt_tokens),
                "completion_tokens": int(c.completion_tokens),
                **scores,
                "error": c.error,
            }
        )
    return pa.Table.from_pylist(out, schema=COMPLETION_SCHEMA)


def report(scored: pa.Table, extra: dict[str, Any] | None = None) -> EvalResult:
    table = aggregate(scored)
    return EvalResult(
        completions=scored, table=table, metrics=build_metrics(scored, table, extra), plot_png=plot_png(table)
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
    paths["table_md"].write_text(markdown_table(result.table))
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
    selected = select_problems(problems, cfg)
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
    selected = select_problems(problems, cfg)  # empty set fails before any download or load
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
    store.publish_bytes(store.uri("evaluate", out_key, "table.md"), markdown_table(result.table).encode())
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
            rows_in=problems.rows, rows_out=result.completions.num_rows, seconds=timer.seconds, extra=extra
        ),
    )
