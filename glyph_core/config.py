"""Stage configurations as pydantic models.

Each stage's config is hashed into its cache key (`storage.stage_key`), so every field here
that changes a stage's output must live in that stage's model, and nothing that does not
(paths of the store, worker counts that do not change results are marked `json_schema_extra=NOT_IN_KEY`).
Unknown keys are errors: a typo in `--set` must not silently run the default.

Every numeric field carries its range (the aliases below), so a value that cannot work
(`train.learning_rate=-1`, `evaluate.max_new_tokens=0`) is refused when the config is built,
before any stage starts, instead of minutes later inside torch or, worse, as a believable
empty result. `invalid_settings` turns pydantic's report into one line that names each field
by its dotted path and the value given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from glyph_core.errors import SettingError
from glyph_core.teachers.registry import MODEL_BACKENDS, TEACHER_BACKENDS

Bucket = Literal["easy", "medium", "hard"]
BUCKETS: tuple[Bucket, ...] = ("easy", "medium", "hard")
Source = Literal["gsm8k", "svamp", "math"]

if TYPE_CHECKING:  # mypy sees a str; pydantic and the JSON schemas see the registered names
    TeacherBackend = str
    ModelBackend = str
else:
    TeacherBackend = Literal[TEACHER_BACKENDS]
    ModelBackend = Literal[MODEL_BACKENDS]


NOT_IN_KEY: dict[str, Any] = {"cache_key": False}

# Ranges, declared once. `| None` on a field keeps None ("no limit", "all") allowed.
Count = Annotated[int, Field(ge=1)]  # batch sizes, n, tokens, steps, limits
NonNegInt = Annotated[int, Field(ge=0)]  # retries, a hold-out size, 0-means-auto worker counts
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # numpy and torch refuse negative or 64-bit seeds
Positive = Annotated[float, Field(gt=0)]  # learning rate, timeouts
Fraction = Annotated[float, Field(ge=0, lt=1)]  # dropout, warmup ratio
SeqLen = Annotated[int, Field(ge=16)]  # a prompt template alone is longer than 16 tokens
Name = Annotated[str, Field(min_length=1)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def key_dump(self) -> dict[str, Any]:
        """The fields that determine a stage's output, for its cache key."""
        out: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and extra.get("cache_key") is False:
                continue
            value = getattr(self, name)
            out[name] = value.key_dump() if isinstance(value, StrictModel) else value
        return _jsonable(out)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_BOUND_KEYS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}


def _problem(err: Any) -> str:
    """What is wrong, worded for a person: `must be > 0`, `unknown setting`."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if "problem" in ctx:  # raised by `_setting_error`
        return str(ctx["problem"])
    if kind in _BOUNDS:
        bound = ctx[_BOUND_KEYS[kind]]
        return f"must be {_BOUNDS[kind]} {int(bound) if float(bound).is_integer() else bound}"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item(s)"
    if kind == "extra_forbidden":
        return "unknown setting"
    if kind == "missing":
        return "required"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg.replace("Input should be", "must be")


def invalid_settings(exc: PydanticValidationError, prefix: str = "") -> SettingError:
    """One line for a config that failed validation: `train.learning_rate=-1: must be > 0`.

    The path is the dotted one a user writes in `--set` (`prefix` for a model validated on its
    own, e.g. "train"); pydantic's union branch names (`list[str]`) are left out, and the
    alternatives a union failed on are joined with "or".
    """
    found: dict[str, list[str]] = {}
    for err in exc.errors():
        ctx = err.get("ctx") or {}
        parts = [prefix] if prefix else []
        parts += [str(p) for p in err["loc"] if isinstance(p, int) or str(p).isidentifier()]
        value = err["input"]
        if "field" in ctx:  # a model validator's error about one of its fields
            parts.append(str(ctx["field"]))
            value = ctx.get("value")
        path = ".".join(parts) or "config"
        shown = "" if err["type"] == "missing" or isinstance(value, dict) else f"={value!r}"
        problem = _problem(err)
        if problem not in found.setdefault(f"{path}{shown}", []):
            found[f"{path}{shown}"].append(problem)
    return SettingError("; ".join(f"{where}: {_either(p)}" for where, p in found.items()))


def _either(problems: list[str]) -> str:
    """`must be a valid list or a valid string`: a union's alternatives in one phrase."""
    rest = [p.removeprefix("must be ") if p.startswith("must be ") else p for p in problems[1:]]
    return " or ".join([problems[0], *rest])


def _setting_error(field: str, value: Any, problem: str) -> PydanticCustomError:
    """An error a model validator raises about one of its fields, so the path names it."""
    return PydanticCustomError(
        "setting", "{field}={value}: {problem}", {"field": field, "value": value, "problem": problem}
    )


class SourceConfig(StrictModel):
    """One dataset: a local directory in the upstream layout, else the Hub at a pinned revision."""

    name: Source
    local_dir: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    revision: str | None = None


class UnifyConfig(StrictModel):
    data_dir: str | None = Field(
        default=None, description="Folder in the layout of ../shared/data; None means the Hub."
    )
    sources: list[Source] = Field(
        default=["gsm8k", "svamp", "math"], min_length=1, description="sources to include"
    )
    svamp_holdout: NonNegInt = Field(default=300, description="SVAMP rows held out by id hash")
    # Subsampling for small profiles; applied after the split, deterministic by id hash.
    max_train_per_source: Count | None = Field(
        default=None, description="at most this many training rows per source"
    )
    max_test_per_source: Count | None = Field(
        default=None, description="at most this many held-out rows per source"
    )
    seed: Seed = Field(default=0, description="seed of the subsampling hash")


# LoRA ranks a vLLM engine can be built for (vLLM's `max_lora_rank` choices); an adapter's rank
# is rounded up to the next one.
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VLLMEngineConfig(StrictModel):
    """Settings of the vLLM engine (`backend=vllm`); the defaults suit one 80 GB GPU and a 7B model.

    They change speed and memory, not what is generated: a request that would not fit
    `max_model_len` becomes an error completion instead of a silently shortened one, so every
    field stays out of the cache keys.
    """

    gpu_memory_utilization: float = Field(
        default=0.90,
        gt=0.0,
        le=0.99,
        description="fraction of GPU memory for weights, activations and KV cache",
    )
    max_model_len: int | None = Field(
        default=None, ge=64, le=1_048_576, description="prompt + completion tokens; None = the model's own"
    )
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="GPUs one engine spans")
    enforce_eager: bool = Field(
        default=False, description="no torch.compile / CUDA graphs: starts ~1 min sooner, decodes slower"
    )
    max_num_seqs: int | None = Field(
        default=None, ge=1, le=65_536, description="sequences per step; None = vLLM's"
    )
    max_lora_rank: int | None = Field(
        default=None, description="None = read from the adapter's adapter_config.json (rounded up)"
    )
    multiprocessing: bool = Field(
        default=False,
        description="VLLM_ENABLE_V1_MULTIPROCESSING: the engine core in a subprocess (hung on some hosts)",
    )
    flashinfer_sampler: bool = Field(
        default=False, description="VLLM_USE_FLASHINFER_SAMPLER: needs the flashinfer wheels"
    )
    batch_invariant: bool = Field(
        default=False,
        description="VLLM_BATCH_INVARIANT: bit-identical output whatever shares the batch; slower",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="more vllm.LLM keyword arguments as they are (load_format, enable_prefix_caching, ...): "
        "for speed and memory only, since they stay out of the cache keys",
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _known_rank(cls, v: int | None) -> int | None:
        if v is not None and v not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {list(VLLM_LORA_RANKS)}")
        return v


class TeacherConfig(StrictModel):
    backend: TeacherBackend = Field(default="reference", description="glyph_core/teachers/registry.py")
    model: Name = Field(
        default="Qwen/Qwen2.5-7B-Instruct",
        description="local dir, Hub id, or alias (smollm2-135m, tiny-random)",
    )
    revision: str | None = Field(default=None, description="Hub revision of the model")
    prompt: Literal["glyph", "latent", "natural"] = Field(default="glyph", description="glyph = teacher mode")
    n: Count = Field(default=1, description="samples per problem")
    temperature: float = Field(default=0.7, ge=0, description="0 = greedy")
    top_p: float = Field(default=0.95, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: Count = Field(default=512, description="generation budget per sample")
    seed: Seed = Field(default=0, description="sampling seed")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="weights dtype"
    )
    trust_remote_code: bool = Field(default=False, description="run the model repository's own code")
    # Throughput knobs: they change speed, not what is generated, so they stay out of the key.
    batch_size: Count = Field(
        default=8, json_schema_extra=NOT_IN_KEY, description="transformers: prompts per generate call"
    )
    base_url: str | None = Field(
        default=None, json_schema_extra=NOT_IN_KEY, description="openai: e.g. http://localhost:8000/v1"
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY", json_schema_extra=NOT_IN_KEY, description="openai: env var holding the key"
    )
    concurrency: Count = Field(
        default=8, json_schema_extra=NOT_IN_KEY, description="openai: requests in flight"
    )
    timeout_s: Positive = Field(
        default=120.0, json_schema_extra=NOT_IN_KEY, description="openai: seconds per request"
    )
    max_retries: NonNegInt = Field(
        default=4, json_schema_extra=NOT_IN_KEY, description="openai: retries on 429/5xx/connection errors"
    )
    device: str | None = Field(
        default=None,
        json_schema_extra=NOT_IN_KEY,
        description="transformers: cpu, cuda, cuda:1 ... (None = auto)",
    )
    vllm: VLLMEngineConfig = Field(
        default_factory=VLLMEngineConfig, json_schema_extra=NOT_IN_KEY, description="vllm: engine settings"
    )
    # LoRA adapters (directories) the teacher serves next to its base model, chosen per call by
    # `generate(..., adapter=dir)`. The evaluate stage uses it to run base and tuned in one engine;
    # what an adapter generates is keyed by the adapter's own hash there, so it stays out of this key.
    adapters: list[str] = Field(
        default_factory=list,
        json_schema_extra=NOT_IN_KEY,
        description="LoRA adapter dirs served beside the base",
    )

    @model_validator(mode="after")
    def _endpoint_given(self) -> TeacherConfig:
        if self.backend == "openai" and not self.base_url:
            raise _setting_error(
                "base_url", self.base_url, "required by backend 'openai' (http://host:8000/v1)"
            )
        return self


class GenerateConfig(StrictModel):
    teacher: TeacherConfig = TeacherConfig()
    split: Literal["train"] = Field(default="train", description="held-out problems never reach generate")
    limit: Count | None = Field(default=None, description="at most this many training problems")
    shard_size: Count = Field(default=64, description="problems per shard (the unit of resume)")
    # Fan-out over GPU workers (docs/design.md, "Fan-out"): shards are keyed on content, so how many
    # workers generated them changes speed, never the output.
    workers: Count = Field(
        default=1, json_schema_extra=NOT_IN_KEY, description="shard groups generated in parallel"
    )
    # Whether a result exists, not what it contains: out of the key, so raising it after a
    # failed run reuses every shard that run generated.
    max_error_rate: float = Field(
        default=0.02,
        ge=0,
        le=1,
        json_schema_extra=NOT_IN_KEY,
        description="the stage fails (publishing nothing) when a larger share of completions are errors",
    )


class FilterConfig(StrictModel):
    max_completion_tokens: Count = Field(
        default=1024, description="longer completions are dropped as too_long"
    )
    require_structure: bool = Field(
        default=True, description="drop traces that break the glyph protocol (off for natural-prompt traces)"
    )
    workers: NonNegInt = Field(
        default=0, json_schema_extra=NOT_IN_KEY, description="answer-checking processes; 0 = one per core"
    )


class RewriteConfig(StrictModel):
    """What the student sees glyphs for, and what natural answers it sees beside them: the levers
    that may teach *when* to use the structure (glyph_core/rewrite.py explains each; docs/sweep.md
    how to sweep them). Every field changes the SFT rows, so every field is in the key."""

    glyph_min_bucket: Bucket = Field(default="hard", description="lowest bucket trained on glyph traces")
    glyph_min_bucket_by_source: dict[Source, Bucket] = Field(
        default_factory=dict,
        description="per-source override of glyph_min_bucket, e.g. {math: hard} (sources not named "
        "use glyph_min_bucket)",
    )
    natural_ratio: float = Field(default=0.5, ge=0, le=50, description="natural rows per glyph row")
    natural_balance: Literal["pooled", "per_source"] = Field(
        default="pooled",
        description="pooled: natural rows drawn from the easy problems of every source together; "
        "per_source: each source gets natural_ratio x its own glyph rows from its own easy problems",
    )
    natural_hard_fraction: Fraction = Field(
        default=0.0,
        description="share of the glyph-bucket problems answered naturally instead of with their glyph traces",
    )
    seed: Seed = Field(default=0, description="seed of the selection and the shuffle")


class LoraConfig(StrictModel):
    r: Count = Field(default=16, description="LoRA rank")
    alpha: Count = Field(default=32, description="LoRA alpha (scale = alpha / r)")
    dropout: Fraction = Field(default=0.05, description="LoRA dropout")
    target_modules: Annotated[list[Name], Field(min_length=1)] | Name = Field(
        default="all-linear", description="modules that get adapters"
    )


class TrainConfig(StrictModel):
    base_model: Name = Field(
        default="Qwen/Qwen2.5-7B-Instruct",
        description="local dir, Hub id, or alias (smollm2-135m, tiny-random)",
    )
    revision: str | None = Field(default=None, description="Hub revision of the base model")
    method: Literal["lora", "full"] = Field(default="lora", description="LoRA adapter or full fine-tuning")
    lora: LoraConfig = LoraConfig()
    epochs: float = Field(default=2.0, ge=0, description="passes over the rows when max_steps is -1")
    max_steps: int = Field(default=-1, ge=-1, description="stop after this many optimizer steps (-1: epochs)")
    learning_rate: Positive = Field(default=2e-4, description="peak learning rate")
    batch_size: Count = Field(
        default=4, description="per device: the global batch is batch_size x grad_accum x num_gpus"
    )
    grad_accum: Count = Field(default=4, description="gradient accumulation steps")
    # Data-parallel processes (glyph_core/launch.py). It changes the global batch, hence the
    # trained weights, so it stays in the cache key.
    num_gpus: int = Field(default=1, ge=1, description="> 1 trains through `accelerate launch`")
    max_seq_len: SeqLen = Field(default=1024, description="rows are truncated to this many tokens")
    packing: bool = Field(
        default=False,
        description="pack rows into max_seq_len blocks (TRL's best-fit decreasing): a step then holds "
        "a different number of rows, so it trains differently (in the key)",
    )
    bf16: Literal["auto", "on", "off"] = Field(
        default="auto", description="auto = on where the GPU supports it"
    )
    merge: bool = Field(default=False, description="merge the LoRA adapter into full weights")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="learning-rate schedule"
    )
    warmup_ratio: Fraction = Field(default=0.0, description="share of the steps spent warming up")
    seed: Seed = Field(default=0, description="training seed")
    trust_remote_code: bool = Field(default=False, description="run the model repository's own code")
    # Speed and bookkeeping only: they do not change the trained weights.
    num_threads: Count | None = Field(
        default=None, json_schema_extra=NOT_IN_KEY, description="torch CPU threads (None = torch's default)"
    )
    device: str | None = Field(
        default=None, json_schema_extra=NOT_IN_KEY, description="None = cuda if available"
    )
    logging_steps: Count = Field(default=1, json_schema_extra=NOT_IN_KEY, description="log every N steps")
    save_steps: Count = Field(
        default=50, json_schema_extra=NOT_IN_KEY, description="checkpoint every N steps"
    )
    launcher: Literal["auto", "inline", "accelerate"] = Field(
        default="auto",
        json_schema_extra=NOT_IN_KEY,
        description="auto = in this process for num_gpus 1, `accelerate launch` above",
    )
    # How a step is computed, not what it computes (docs/gpu.md, "Fast SFT"): the rows of each
    # optimizer step and the loss over their completion tokens stay the same, so these stay out of
    # the key. "auto" resolves on the host that trains (`trainer.resolve_speed`): today's settings
    # on a CPU, the fast ones on a GPU; the key, computed wherever the parent runs, never sees it.
    micro_batch_size: Literal["auto"] | Count | None = Field(
        default="auto",
        json_schema_extra=NOT_IN_KEY,
        description="rows per forward pass; divides batch_size x grad_accum (the rows of an optimizer "
        "step); None = batch_size; auto = batch_size on a CPU, the fastest that fits on a GPU",
    )
    padding_free: Literal["auto"] | bool = Field(
        default="auto",
        json_schema_extra=NOT_IN_KEY,
        description="a micro-batch's rows concatenated with position ids, no padding tokens and no "
        "attention across rows; auto = on a GPU",
    )
    gradient_checkpointing: Literal["auto"] | bool = Field(
        default="auto",
        json_schema_extra=NOT_IN_KEY,
        description="recompute activations in the backward pass to fit larger micro-batches; "
        "auto = off on a CPU, on a GPU where it pays (resolve_speed)",
    )
    liger_kernel: Literal["auto"] | bool = Field(
        default="auto",
        json_schema_extra=NOT_IN_KEY,
        description="Liger Kernel's RMSNorm, RoPE and SwiGLU (Triton; TRL keeps its own fused LM head "
        "and loss); auto = on a GPU where liger-kernel is installed",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        default="auto",
        json_schema_extra=NOT_IN_KEY,
        description="transformers' attention; auto = flash_attention_2 on a GPU where flash-attn is "
        "installed, else sdpa (padding-free: a block-diagonal mask from the position ids)",
    )
    torch_compile: bool = Field(
        default=False, json_schema_extra=NOT_IN_KEY, description="torch.compile the model (Trainer's)"
    )

    @model_validator(mode="after")
    def _trains_something(self) -> TrainConfig:
        """`epochs=0` with `max_steps=-1` would publish an untrained adapter as "tuned"."""
        if self.max_steps == 0:
            raise _setting_error("max_steps", 0, "must be -1 (train for `epochs`) or >= 1")
        if self.max_steps == -1 and self.epochs <= 0:
            raise _setting_error("epochs", self.epochs, "must be > 0 when max_steps=-1 (train for `epochs`)")
        step_rows = self.batch_size * self.grad_accum
        if isinstance(self.micro_batch_size, int) and step_rows % self.micro_batch_size:
            raise _setting_error(
                "micro_batch_size",
                self.micro_batch_size,
                f"must divide batch_size x grad_accum = {step_rows} (the rows of an optimizer step)",
            )
        return self


class EvalConfig(StrictModel):
    split: Literal["test"] = Field(default="test", description="only held-out problems are evaluated")
    per_stratum: Count | None = Field(
        default=None,
        ge=1,
        description="problems per sampling stratum (source and its own difficulty level: MATH level, "
        "GSM8K solution steps, SVAMP operators); None = every held-out problem",
    )
    max_new_tokens: Count = Field(default=512, description="generation budget per problem")
    batch_size: Count = Field(
        default=16, json_schema_extra=NOT_IN_KEY, description="prompts per generate() batch"
    )
    backend: ModelBackend = Field(default="transformers", description="a backend that loads a model")
    compare_base: bool = Field(default=True, description="also evaluate the base model on the same problems")
    seed: Seed = Field(default=0, description="decoding seed")
    # Whether a result exists, not what it contains (as generate's): out of the key.
    max_error_rate: float = Field(
        default=0.02,
        ge=0,
        le=1,
        json_schema_extra=NOT_IN_KEY,
        description="the stage fails (publishing nothing) when a larger share of a model's completions are errors",
    )
    vllm: VLLMEngineConfig = Field(
        default_factory=VLLMEngineConfig, json_schema_extra=NOT_IN_KEY, description="vllm: engine settings"
    )
