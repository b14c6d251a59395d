"""The trainer: supervised fine-tuning of the student on chat-format SFT rows with TRL + PEFT.

It knows nothing of stores, keys or how it is launched (like TRL's own `sft.py` script): the
launcher (`glyph_core.launch`) runs it in this process or on every rank of `accelerate launch`,
and the train stage (`glyph_core.train`) keys, publishes and reports it (docs/design.md, "Train").

Why it is built this way:

* **Loss on the assistant turn only**, through TRL's *prompt-completion* format: each chat row
  becomes ``prompt`` (every message before the last assistant turn) and ``completion`` (that
  turn). TRL then masks the prompt itself. ``assistant_only_loss=True`` would need a chat template
  with ``{% generation %}`` markers, which the SmolLM2 and Qwen templates do not have.
* **Validation before heavy work**: rows without an assistant turn and model directories without
  weights or tokenizer fail with a :class:`GlyphError` naming the row or the directory before any
  model is loaded, because a 7B load takes minutes and a bad row found then wastes them.
* **Resume after a crash**: checkpoints live in ``output_dir/checkpoints``; a second call with the
  same ``output_dir`` continues from the last complete one (weights, optimizer, scheduler, RNG
  and the log history, so the metrics table covers the whole run).
* **Metrics** come from the trainer's own log history plus a wall-clock stamp per log entry, so
  tokens/s is measured, not estimated.
* **Progress**: ``progress(step, max_steps)`` is called after every optimizer step on rank 0
  (a ``TrainerCallback``), so the train stage's progress artifact moves while it trains.
* **Fast on a GPU, the same loss everywhere** (docs/gpu.md, "Fast SFT"): :func:`resolve_speed`
  turns the ``auto`` settings into how each step is computed on this host (micro-batch and
  accumulation, padding-free batches, gradient checkpointing, Liger kernels, attention); the rows
  of every optimizer step and the token-weighted loss over their completion tokens do not change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from glyph_core.config import TrainConfig
from glyph_core.errors import GlyphError
from glyph_core.models import resolve_base_model
from glyph_core.storage import DatasetRef, Store

log = logging.getLogger(__name__)
VERSION = "1"
"""The train stage's version: it enters the key and the manifest. Bump it when the trainer
changes what it writes."""
MODEL_SUBDIR = "model"
CHECKPOINT_SUBDIR = "checkpoints"
MANIFEST_NAME = "manifest.json"
RUN_NAME = "run.json"
"""Beside the model directory: how the run went (`TrainResult.run`)."""
RUN_FACTS = ("train_seconds", "tokens_per_s")
"""Measured, so different in every run: in `run.json`, never in the manifest."""
SET_VALUED = ("target_modules", "modules_to_save", "exclude_modules")
"""adapter_config.json fields PEFT keeps as Python sets and writes in their (per-process) order."""

StepProgress = Callable[[int, int], None]
"""`progress(step, max_steps)` after every optimizer step (rank 0 only)."""


@dataclass
class TrainResult:
    """What a training run leaves behind. ``model`` is the in-memory trained model (for tests and
    callers that continue in-process); it is not part of any artifact. ``run`` says how this
    run went (seconds, tokens/s, the checkpoint it resumed from, the base model's local path):
    kept apart from the manifest, which describes only the weights (`_manifest`)."""

    model_dir: Path
    manifest: dict[str, Any]
    metrics: pa.Table
    kind: str  # "lora" | "full"
    model: Any = field(default=None, repr=False)
    speed: Speed | None = None  # how the steps were computed on this host (resolve_speed)
    run: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# validation


def _row_label(i: int, row: dict[str, Any]) -> str:
    return f"SFT row {i}" + (f" (id={row['id']!r})" if row.get("id") is not None else "")


def to_prompt_completion(rows: pa.Table) -> list[dict[str, Any]]:
    """Chat rows → TRL conversational prompt-completion rows, validating each row.

    The completion is the *last* assistant turn; everything before it is prompt (masked). A row
    must have at least one non-assistant message before it and non-empty assistant content.
    """
    if "messages" not in rows.column_names:
        raise GlyphError(f"SFT rows have no 'messages' column (columns: {rows.column_names})")
    if rows.num_rows == 0:
        raise GlyphError("SFT rows are empty: nothing to train on")
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows.to_pylist()):
        msgs = row.get("messages") or []
        label = _row_label(i, row)
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise GlyphError(f"{label}: every message needs 'role' and 'content', got {m!r}")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise GlyphError(f"{label}: no assistant turn at the end of 'messages'")
        if not (msgs[-1]["content"] or "").strip():
            raise GlyphError(f"{label}: the assistant turn is empty")
        prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
        if not prompt or all(m["role"] == "assistant" for m in prompt):
            raise GlyphError(f"{label}: no user turn before the assistant turn")
        out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": msgs[-1]["content"]}]})
    return out


# ---------------------------------------------------------------------------------------------
# metrics


def _callbacks(progress: StepProgress | None) -> list[Any]:
    """Our `TrainerCallback`s: a wall-clock stamp per log entry, and step progress.

    Built here rather than at module level because `transformers` takes seconds to import and
    the stage, the CLI and `glyph --help` import this module without training anything.
    """
    from transformers import TrainerCallback

    class WallClock(TrainerCallback):
        """Stamps each log entry with the seconds since the previous one in this process, so
        tokens/s survives a resume (the earlier entries come back with the checkpoint)."""

        def __init__(self) -> None:
            self.last = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            now = time.perf_counter()
            if state.log_history:
                state.log_history[-1]["interval_s"] = now - self.last
            self.last = now
            if logs and "loss" in logs and state.is_world_process_zero:
                log.info(
                    "step %d/%d loss %.4f tokens %s",
                    state.global_step,
                    state.max_steps,
                    float(logs["loss"]),
                    logs.get("num_input_tokens_seen"),
                )

    class Steps(TrainerCallback):
        """`progress(step, max_steps)` after every optimizer step, on rank 0; and a log entry at
        the last step whatever `logging_steps` is, so the metrics (and the summary's step count
        and final loss) reach the end of training instead of the last multiple of it."""

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True
            if progress is not None and state.is_world_process_zero:
                progress(int(state.global_step), int(state.max_steps))

    return [WallClock(), Steps()]


METRIC_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "learning_rate",
    "grad_norm",
    "mean_token_accuracy",
    "tokens_seen",
    "interval_s",
    "tokens_per_s",
    "s_per_step",
)


def metrics_table(log_history: list[dict[str, Any]]) -> pa.Table:
    """One row per logging step: loss curve, learning rate, tokens seen and measured speed."""
    rows: list[dict[str, Any]] = []
    prev_tokens, prev_step = 0.0, 0
    for entry in log_history:
        if "loss" not in entry:
            continue  # the final summary entry (train_runtime, ...) has no per-step loss
        tokens = float(entry.get("num_input_tokens_seen", entry.get("num_tokens", 0.0)))
        step = int(entry.get("step", 0))
        interval = entry.get("interval_s")
        d_tok, d_step = tokens - prev_tokens, step - prev_step
        rows.append(
            {
                "step": step,
                "epoch": float(entry.get("epoch", 0.0)),
                "loss": float(entry["loss"]),
                "learning_rate": float(entry.get("learning_rate", math.nan)),
                "grad_norm": float(entry.get("grad_norm", math.nan)),
                "mean_token_accuracy": float(entry.get("mean_token_accuracy", math.nan)),
                "tokens_seen": tokens,
                "interval_s": float(interval) if interval is not None else math.nan,
                "tokens_per_s": d_tok / interval if interval else math.nan,
                "s_per_step": interval / d_step if interval and d_step > 0 else math.nan,
            }
        )
        prev_tokens, prev_step = tokens, step
    schema = pa.schema([("step", pa.int64())] + [(c, pa.float64()) for c in METRIC_COLUMNS if c != "step"])
    return pa.Table.from_pylist(rows, schema=schema)


def summarize_metrics(metrics: pa.Table) -> dict[str, Any]:
    rows = metrics.to_pylist()
    if not rows:
        return {"steps": 0}
    # `.get`: a table written before a column existed still summarises (NaN != NaN skips gaps)
    speeds = [v for r in rows if (v := r.get("tokens_per_s")) is not None and v == v]
    secs = [v for r in rows if (v := r.get("interval_s")) is not None and v == v]
    tokens = rows[-1].get("tokens_seen")
    total_s = sum(secs)
    return {
        "steps": rows[-1]["step"],
        "first_loss": rows[0]["loss"],
        "final_loss": rows[-1]["loss"],
        "tokens_seen": tokens,
        "train_seconds": total_s,
        "tokens_per_s": (tokens / total_s) if total_s else (sum(speeds) / len(speeds) if speeds else None),
    }


# ---------------------------------------------------------------------------------------------
# training


# torch is imported inside the functions that need it: importing it costs seconds, and the
# stage, the CLI and the tests import this module without training.


def _device(cfg: TrainConfig) -> str:
    import torch

    if cfg.device:
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _use_bf16(cfg: TrainConfig, device: str) -> bool:
    import torch

    if cfg.bf16 == "on":
        return True
    if cfg.bf16 == "off":
        return False
    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# ---------------------------------------------------------------------------------------------
# speed: how each optimizer step is computed on this host


@dataclass(frozen=True)
class Speed:
    """The resolved ``auto`` settings: how a step is computed here, never what it computes."""

    micro_batch_size: int  # rows per forward/backward pass
    grad_accum: int  # passes per optimizer step: micro_batch_size x grad_accum = the step's rows
    padding_free: bool
    gradient_checkpointing: bool
    liger_kernel: bool
    attn_implementation: str | None  # None: the model's default (transformers picks sdpa)
    torch_compile: bool
    why: str  # one line: the memory estimate behind the micro-batch, for the log and the manifest


@dataclass(frozen=True)
class Host:
    """What :func:`resolve_speed` needs to know about the training host and the model."""

    cuda: bool
    gpu_bytes: int = 0  # total memory of one GPU
    weight_bytes: int = 0  # the loaded model's parameters
    params: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    num_layers: int = 0
    mean_row_tokens: float = 0.0  # of this run's rows, truncated at max_seq_len
    liger_installed: bool = False
    flash_attn_installed: bool = False


# Activation memory per token of a decoder layer in bytes, in multiples of hidden (h) and MLP (i)
# widths, bf16, LoRA on every linear layer, attention without an S x S matrix (sdpa/flash). What
# autograd keeps: each RMSNorm's input (fp32 copies in transformers' own, ~10h; Liger's keeps 2h),
# q/k/v/o inputs and the attention's q, k, v, output (~12h), and the MLP's gate, up, SiLU and
# product (8i; Liger's SwiGLU recomputes SiLU: 6i). LoRA dropout > 0 keeps a dropped copy and a
# mask of each adapted layer's input (3 bytes x (6h + i)).
_NORM_BYTES = {False: 10, True: 2}
_ATTN_BYTES = 12
_MLP_BYTES = {False: 8, True: 6}
# Measured over estimated: Liger, batch 8 x 1,024 tokens, no checkpointing on the 7B shape took
# 73 GiB on an H100 (issue 18), 7.2 MiB of activations a token against 4.6 MiB estimated above:
# the backward's transient buffers and the allocator's slack.
_MEASURED_OVER_ESTIMATE = 1.6
GPU_MEMORY_FRACTION = 0.90  # of the card for weights, optimizer and activations; the rest is slack
# A forward+backward pass costs as if it held this many more tokens: kernel launches (LoRA adds
# ~35 small kernels a layer) and weight reads that do not shrink with the batch. It decides when
# checkpointing (1.5x the FLOPs for LoRA: 6PT against 4PT) buys a micro-batch large enough to pay.
PASS_OVERHEAD_TOKENS = 512
# Attention kernels that take a dense mask (sdpa's memory-efficient kernel, eager) compute every
# block of a padding-free pass of T tokens, masked or not: 3 x 4*T^2*h*L FLOPs (forward and
# backward), which grows the cost of one long pass; varlen/block-sparse kernels skip them.
_DENSE_MASK_ATTENTION = (None, "sdpa", "eager")


def _layer_bytes_per_token(host: Host, liger: bool, dropout: float) -> float:
    h, i = host.hidden_size, host.intermediate_size
    per = (2 * _NORM_BYTES[liger] + _ATTN_BYTES) * h + _MLP_BYTES[liger] * i
    if dropout > 0:
        per += 3 * (6 * h + i)
    return per * _MEASURED_OVER_ESTIMATE


def activation_bytes_per_token(host: Host, *, liger: bool, dropout: float, checkpointing: bool) -> float:
    """Peak activation bytes per token of a micro-batch: every layer's, or with checkpointing the
    layers' bf16 inputs plus one layer recomputed at a time; plus the fused LM head's fp32 grads."""
    layer = _layer_bytes_per_token(host, liger, dropout)
    body = (2 * host.hidden_size * host.num_layers + layer) if checkpointing else layer * host.num_layers
    return body + 6 * host.hidden_size


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_speed(cfg: TrainConfig, host: Host) -> Speed:
    """The ``auto`` settings for this host; explicit settings are kept as they are.

    On a CPU: today's way (micro-batch = ``batch_size``, padded batches, no checkpointing, no
    Liger, the model's attention). On a GPU: padding-free batches, Liger where installed,
    flash-attn where installed, and the micro-batch (a divisor of the step's rows) and
    checkpointing that minimise ``factor x (tokens + passes x per-pass overhead)`` per step
    among those whose worst case (every row ``max_seq_len`` tokens) fits the card (the overhead:
    ``PASS_OVERHEAD_TOKENS``, plus masked attention's wasted blocks where the kernel takes a
    dense mask).
    """
    step_rows = cfg.batch_size * cfg.grad_accum
    gpu = host.cuda
    liger = (gpu and host.liger_installed) if cfg.liger_kernel == "auto" else bool(cfg.liger_kernel)
    padding_free = cfg.packing or (gpu if cfg.padding_free == "auto" else bool(cfg.padding_free))
    attn: str | None
    if cfg.attn_implementation == "auto":
        attn = ("flash_attention_2" if host.flash_attn_installed else "sdpa") if gpu else None
    else:
        attn = cfg.attn_implementation

    def speed(micro: int, ckpt: bool, why: str) -> Speed:
        return Speed(micro, step_rows // micro, padding_free, ckpt, liger, attn, cfg.torch_compile, why)

    fixed_micro = cfg.micro_batch_size != "auto" or not gpu
    fixed_ckpt = cfg.gradient_checkpointing != "auto" or not gpu
    if fixed_micro and fixed_ckpt:
        micro = cfg.batch_size if cfg.micro_batch_size in ("auto", None) else int(cfg.micro_batch_size)
        return speed(micro, cfg.gradient_checkpointing is True, "as configured")

    # the worst case of a micro-batch: every row max_seq_len tokens (packing: every row is)
    budget = GPU_MEMORY_FRACTION * host.gpu_bytes - 1.1 * host.weight_bytes - 2**30
    dropout = cfg.lora.dropout if cfg.method == "lora" else 0.0
    recompute = 1.5 if cfg.method == "lora" else 4 / 3  # LoRA: 6PT / 4PT; full: 8PT / 6PT
    mean = cfg.max_seq_len if cfg.packing else min(host.mean_row_tokens or cfg.max_seq_len, cfg.max_seq_len)
    micros = (
        _divisors(step_rows) if cfg.micro_batch_size == "auto" else [cfg.micro_batch_size or cfg.batch_size]
    )
    ckpts = [False, True] if cfg.gradient_checkpointing == "auto" else [bool(cfg.gradient_checkpointing)]
    best: tuple[float, int, bool, float] | None = None
    for ckpt in ckpts:
        per_token = activation_bytes_per_token(host, liger=liger, dropout=dropout, checkpointing=ckpt)
        fits = [m for m in micros if m * cfg.max_seq_len * per_token <= budget]
        if not fits:
            continue
        m = max(fits)
        per_pass = float(PASS_OVERHEAD_TOKENS)
        if padding_free and attn in _DENSE_MASK_ATTENTION and host.params:
            t = m * mean  # the tokens of a typical pass, all attending over one dense mask
            per_pass += 3 * t * t * host.hidden_size * host.num_layers / host.params
        cost = (recompute if ckpt else 1.0) * (step_rows * mean + step_rows / m * per_pass)
        if best is None or cost < best[0]:
            best = (cost, m, ckpt, per_token)
    if best is None:  # nothing fits by the estimate: the smallest footprint, and let torch say
        return speed(min(micros), ckpts[-1], f"nothing fits {budget / 2**30:.1f} GiB by the estimate")
    _, m, ckpt, per_token = best
    return speed(
        m,
        ckpt,
        f"{m} rows x {cfg.max_seq_len} tokens x {per_token / 2**20:.2f} MiB/token "
        f"<= {budget / 2**30:.1f} GiB for activations; mean row {mean:.0f} tokens",
    )


def _host(cfg: TrainConfig, device: str, model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> Host:
    """This host and model as :func:`resolve_speed` sees them (the GPU's size before any use)."""
    import importlib.util

    import torch

    if not device.startswith("cuda"):
        return Host(cuda=False)
    text = model.config.get_text_config()
    sample = records[:: max(1, len(records) // 512)]  # the mean row length from up to ~512 rows
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in sample]
    lengths = [
        min(len(ids), cfg.max_seq_len) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]
    return Host(
        cuda=True,
        gpu_bytes=torch.cuda.get_device_properties(torch.device(device)).total_memory,
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        params=sum(p.numel() for p in model.parameters()),
        hidden_size=int(text.hidden_size),
        intermediate_size=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
        num_layers=int(text.num_hidden_layers),
        mean_row_tokens=sum(lengths) / max(1, len(lengths)),
        liger_installed=importlib.util.find_spec("liger_kernel") is not None,
        flash_attn_installed=importlib.util.find_spec("flash_attn") is not None,
    )


def _check_speed_settings(cfg: TrainConfig, device: str) -> None:
    """Explicit speed settings this host cannot honour fail before the model loads."""
    import importlib.util

    if cfg.liger_kernel is True:
        if not device.startswith("cuda"):
            raise GlyphError(f"train.liger_kernel=true needs a CUDA device (Triton kernels), got {device!r}")
        if importlib.util.find_spec("liger_kernel") is None:
            raise GlyphError(
                "train.liger_kernel=true but liger-kernel is not installed (pip install liger-kernel)"
            )
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise GlyphError("train.attn_implementation=flash_attention_2 but flash-attn is not installed")


def _padding_free_collator(tokenizer: Any) -> Any:
    """TRL's own collator in padding-free mode: a micro-batch's rows concatenated into one
    sequence with position ids restarting at 0 per row, so transformers' masks keep rows apart,
    and the first token of each row never a target.

    Passed as a collator instead of ``SFTConfig(padding_free=True)`` because TRL 1.16 refuses
    that flag with ``max_length`` unless packing, although its dataset preparation truncates to
    ``max_length`` either way; this keeps the truncation (and so the trained tokens) of padded
    runs."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)


def _checkpointing_arg(config_cls: Any, on: bool) -> dict[str, Any]:
    """transformers 5 renamed ``gradient_checkpointing`` to ``activation_checkpointing``; TRL's
    config still defaults the old name to True, so the new one is set explicitly when it exists."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return (
        {"activation_checkpointing": on}
        if "activation_checkpointing" in names
        else {"gradient_checkpointing": on}
    )


def _last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint that finished saving (it has its trainer state)."""
    if not ckpt_dir.is_dir():
        return None
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    if not done:
        return None
    return str(max(done, key=lambda p: int(p.name.rsplit("-", 1)[1])))


def _normalise_adapter_config(model_dir: Path, base_model: str) -> None:
    """Make adapter_config.json a function of the training alone, so an identical retrain writes
    identical bytes (and the same manifest hash, which keys evaluate):

    - PEFT keeps `target_modules` (and the other fields in `SET_VALUED`) as a set and writes it
      in the process's hash order, different from run to run: written sorted;
    - PEFT records the base as the path it was loaded from; for an alias (``smollm2-135m``) that
      is this host's cache directory, which a GPU worker elsewhere does not have. The alias is
      recorded instead: the teacher backends resolve it on whichever host loads the adapter.
    """
    cfg_path = model_dir / "adapter_config.json"
    if not cfg_path.exists():
        return
    data = json.loads(cfg_path.read_text())
    if not Path(base_model).expanduser().exists():
        data["base_model_name_or_path"] = base_model
    for name in SET_VALUED:
        if isinstance(data.get(name), list):
            data[name] = sorted(data[name], key=str)
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _manifest(
    cfg: TrainConfig, kind: str, data_sha256: str, rows: int, summary: dict[str, Any]
) -> dict[str, Any]:
    """What the published weights are, and nothing about how this run went: the config that
    enters the key (not devices or thread counts), the data's hash and the deterministic part of
    the metrics (steps, losses, tokens). An identical retrain, or one resumed after a crash,
    then writes the same manifest, and evaluate's key (the manifest hash) stays put."""
    return {
        "stage": "train",
        "version": VERSION,
        "base_model": cfg.base_model,
        "kind": kind,
        "data_sha256": data_sha256,
        "rows": rows,
        "config": cfg.key_dump(),
        "metrics": {k: v for k, v in summary.items() if k not in RUN_FACTS},
    }


def _load_rows(sft_rows: pa.Table | DatasetRef, store: Store | None) -> tuple[pa.Table, str | None]:
    if isinstance(sft_rows, DatasetRef):
        if store is None:
            raise GlyphError("a DatasetRef needs the Store it lives in")
        return store.read_table(sft_rows), sft_rows.sha256
    return sft_rows, None


def _table_sha256(table: pa.Table) -> str:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def train_sft(
    sft_rows: pa.Table | DatasetRef,
    cfg: TrainConfig,
    output_dir: str | Path,
    *,
    store: Store | None = None,
    data_sha256: str | None = None,
    keep_model: bool = True,
    callbacks: list[Any] | None = None,
    progress: StepProgress | None = None,
) -> TrainResult:
    """Fine-tune ``cfg.base_model`` on chat-format SFT rows; the artifact goes to
    ``output_dir/model`` (adapter, or full/merged weights) with a ``manifest.json``.

    Calling again with the same ``output_dir`` after a crash resumes from the last checkpoint.
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (tests); ``progress(step,
    max_steps)`` is called after every optimizer step on rank 0.
    """
    table, ref_sha = _load_rows(sft_rows, store)
    data_sha256 = data_sha256 or ref_sha or _table_sha256(table)
    records = to_prompt_completion(table)  # validates rows before any model loads
    base_path = resolve_base_model(cfg.base_model)

    # Heavy imports (seconds) only once the rows and the model directory have passed the checks.
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    output_dir = Path(output_dir)
    ckpt_dir = output_dir / CHECKPOINT_SUBDIR
    model_dir = output_dir / MODEL_SUBDIR
    device = _device(cfg)
    bf16 = _use_bf16(cfg, device)
    _check_speed_settings(cfg, device)

    tokenizer = AutoTokenizer.from_pretrained(
        base_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.chat_template is None:
        raise GlyphError(f"base model {cfg.base_model} has no chat template; SFT rows are chat-format")
    attn = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        base_path,
        revision=cfg.revision,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        trust_remote_code=cfg.trust_remote_code,
        **({} if attn == "auto" else {"attn_implementation": attn}),
    )
    speed = resolve_speed(cfg, _host(cfg, device, model, tokenizer, records))
    if attn == "auto" and speed.attn_implementation is not None:
        model.set_attn_implementation(speed.attn_implementation)
    log.info("train speed settings: %s", speed)

    peft_config = None
    if cfg.method == "lora":
        from peft import LoraConfig as PeftLoraConfig

        peft_config = PeftLoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )

    args = SFTConfig(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=speed.micro_batch_size,
        gradient_accumulation_steps=speed.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=float(cfg.warmup_ratio),  # a float in [0, 1) is a ratio of total steps
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        max_length=cfg.max_seq_len,
        packing=cfg.packing,  # TRL's "bfd": padding-free by itself
        **_checkpointing_arg(SFTConfig, speed.gradient_checkpointing),
        use_liger_kernel=speed.liger_kernel,
        torch_compile=speed.torch_compile,
        bf16=bf16,
        fp16=False,
        use_cpu=device == "cpu",
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to=[],
        # padding-free batches have no padding and no attention mask: "non_padding" would count
        # input ids unequal to the pad token, and the pad token (eos) also ends every turn
        include_num_input_tokens_seen="all" if speed.padding_free else "non_padding",
        completion_only_loss=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=peft_config,
        data_collator=_padding_free_collator(tokenizer) if speed.padding_free and not cfg.packing else None,
        callbacks=[*_callbacks(progress), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # our callback logs one line per step instead
    resume = _last_checkpoint(ckpt_dir)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.state.global_step == 0:  # the config's checks should make this impossible; never publish it
        raise GlyphError(
            f"training ran 0 optimizer steps ({len(records)} rows, epochs={cfg.epochs}, "
            f"max_steps={cfg.max_steps}, batch {cfg.batch_size} x grad_accum {cfg.grad_accum}): "
            "nothing was published; raise train.epochs or set train.max_steps >= 1"
        )
    metrics = metrics_table(trainer.state.log_history)
    if not trainer.is_world_process_zero():  # several processes (glyph_core/launch.py): rank 0 saves
        return TrainResult(model_dir=model_dir, manifest={}, metrics=metrics, kind=cfg.method, speed=speed)

    # Publish the artifact: write into a sibling temp dir and rename, so a crash while saving
    # never leaves a half-written model directory that looks complete.
    tmp = output_dir / f".{MODEL_SUBDIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trained: Any = trainer.model
    kind = cfg.method
    if cfg.method == "lora" and cfg.merge:
        trained = trained.merge_and_unload()
        kind = "full"
    trained.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _normalise_adapter_config(tmp, cfg.base_model)
    summary = summarize_metrics(metrics)
    manifest = _manifest(cfg, kind, data_sha256, table.num_rows, summary)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    run = {
        **{k: summary.get(k) for k in RUN_FACTS},
        "global_step": int(trainer.state.global_step),
        "resumed_from": resume,
        "base_model_path": base_path,
        "speed": dataclasses.asdict(speed),  # this host's resolution: not in the manifest
    }
    (output_dir / RUN_NAME).write_text(json.dumps(run, indent=2, sort_keys=True, default=str))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    trained.eval()
    return TrainResult(
        model_dir=model_dir,
        manifest=manifest,
        metrics=metrics,
        kind=kind,
        model=trained if keep_model else None,
        speed=speed,
        run=run,
    )
