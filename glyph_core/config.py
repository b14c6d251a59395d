"""Stage configurations as pydantic models.

Each stage's config is hashed into its cache key (`storage.stage_key`), so every field here
that changes a stage's output must live in that stage's model, and nothing that does not
(paths of the store, worker counts that do not change results are marked `json_schema_extra=NOT_IN_KEY`).
Unknown keys are errors: a typo in `--set` must not silently run the default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from glyph_core.teachers.registry import MODEL_BACKENDS, TEACHER_BACKENDS

Bucket = Literal["easy", "medium", "hard"]
BUCKETS: tuple[Bucket, ...] = ("easy", "medium", "hard")

if TYPE_CHECKING:  # mypy sees a str; pydantic and the JSON schemas see the registered names
    TeacherBackend = str
    ModelBackend = str
else:
    TeacherBackend = Literal[TEACHER_BACKENDS]
    ModelBackend = Literal[MODEL_BACKENDS]


NOT_IN_KEY: dict[str, Any] = {"cache_key": False}


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


class SourceConfig(StrictModel):
    """One dataset: a local directory in the upstream layout, else the Hub at a pinned revision."""

    name: Literal["gsm8k", "svamp", "math"]
    local_dir: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    revision: str | None = None


class UnifyConfig(StrictModel):
    data_dir: str | None = Field(
        default=None, description="Folder in the layout of ../shared/data; None means the Hub."
    )
    sources: list[Literal["gsm8k", "svamp", "math"]] = Field(
        default=["gsm8k", "svamp", "math"], description="sources to include"
    )
    svamp_holdout: int = Field(default=300, description="SVAMP rows held out by id hash")
    # Subsampling for small profiles; applied after the split, deterministic by id hash.
    max_train_per_source: int | None = Field(
        default=None, description="at most this many training rows per source"
    )
    max_test_per_source: int | None = Field(
        default=None, description="at most this many held-out rows per source"
    )
    seed: int = Field(default=0, description="seed of the subsampling hash")


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
    model: str = Field(
        default="Qwen/Qwen2.5-7B-Instruct",
        description="local dir, Hub id, or alias (smollm2-135m, tiny-random)",
    )
    revision: str | None = Field(default=None, description="Hub revision of the model")
    prompt: Literal["glyph", "latent", "natural"] = Field(default="glyph", description="glyph = teacher mode")
    n: int = Field(default=1, description="samples per problem")
    temperature: float = Field(default=0.7, description="0 = greedy")
    top_p: float = Field(default=0.95, description="nucleus sampling mass")
    max_new_tokens: int = Field(default=512, description="generation budget per sample")
    seed: int = Field(default=0, description="sampling seed")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="weights dtype"
    )
    trust_remote_code: bool = Field(default=False, description="run the model repository's own code")
    # Throughput knobs: they change speed, not what is generated, so they stay out of the key.
    batch_size: int = Field(
        default=8, json_schema_extra=NOT_IN_KEY, description="transformers: prompts per generate call"
    )
    base_url: str | None = Field(
        default=None, json_schema_extra=NOT_IN_KEY, description="openai: e.g. http://localhost:8000/v1"
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY", json_schema_extra=NOT_IN_KEY, description="openai: env var holding the key"
    )
    concurrency: int = Field(
        default=8, json_schema_extra=NOT_IN_KEY, description="openai: requests in flight"
    )
    timeout_s: float = Field(
        default=120.0, json_schema_extra=NOT_IN_KEY, description="openai: seconds per request"
    )
    max_retries: int = Field(
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


class GenerateConfig(StrictModel):
    teacher: TeacherConfig = TeacherConfig()
    split: Literal["train"] = Field(default="train", description="held-out problems never reach generate")
    limit: int | None = Field(default=None, description="at most this many training problems")
    shard_size: int = Field(default=64, description="problems per shard (the unit of resume)")
    # Fan-out over GPU workers (docs/design.md, "Fan-out"): shards are keyed on content, so how many
    # workers generated them changes speed, never the output.
    workers: int = Field(
        default=1, json_schema_extra=NOT_IN_KEY, description="shard groups generated in parallel"
    )


class FilterConfig(StrictModel):
    max_completion_tokens: int = Field(default=1024, description="longer completions are dropped as too_long")
    require_structure: bool = Field(
        default=True, description="drop traces that break the glyph protocol (off for natural-prompt traces)"
    )
    workers: int = Field(
        default=0, json_schema_extra=NOT_IN_KEY, description="answer-checking processes; 0 = one per core"
    )


class RewriteConfig(StrictModel):
    glyph_min_bucket: Bucket = Field(default="hard", description="lowest bucket trained on glyph traces")
    natural_ratio: float = Field(default=0.5, description="natural rows per glyph row")
    seed: int = Field(default=0, description="seed of the selection and the shuffle")


class LoraConfig(StrictModel):
    r: int = Field(default=16, description="LoRA rank")
    alpha: int = Field(default=32, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(default=0.05, description="LoRA dropout")
    target_modules: list[str] | str = Field(default="all-linear", description="modules that get adapters")


class TrainConfig(StrictModel):
    base_model: str = Field(
        default="Qwen/Qwen2.5-7B-Instruct",
        description="local dir, Hub id, or alias (smollm2-135m, tiny-random)",
    )
    revision: str | None = Field(default=None, description="Hub revision of the base model")
    method: Literal["lora", "full"] = Field(default="lora", description="LoRA adapter or full fine-tuning")
    lora: LoraConfig = LoraConfig()
    epochs: float = Field(default=2.0, description="passes over the rows when max_steps is -1")
    max_steps: int = Field(default=-1, description="stop after this many optimizer steps (-1: epochs)")
    learning_rate: float = Field(default=2e-4, description="peak learning rate")
    batch_size: int = Field(
        default=4, description="per device: the global batch is batch_size x grad_accum x num_gpus"
    )
    grad_accum: int = Field(default=4, description="gradient accumulation steps")
    # Data-parallel processes (glyph_core/launch.py). It changes the global batch, hence the
    # trained weights, so it stays in the cache key.
    num_gpus: int = Field(default=1, ge=1, description="> 1 trains through `accelerate launch`")
    max_seq_len: int = Field(default=1024, description="rows are truncated to this many tokens")
    packing: bool = Field(default=False, description="pack rows into max_seq_len blocks")
    padding_free: bool = Field(default=False, description="no padding tokens (flash attention)")
    gradient_checkpointing: bool = Field(default=False, description="recompute activations to save memory")
    bf16: Literal["auto", "on", "off"] = Field(
        default="auto", description="auto = on where the GPU supports it"
    )
    merge: bool = Field(default=False, description="merge the LoRA adapter into full weights")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="learning-rate schedule"
    )
    warmup_ratio: float = Field(default=0.0, description="share of the steps spent warming up")
    seed: int = Field(default=0, description="training seed")
    trust_remote_code: bool = Field(default=False, description="run the model repository's own code")
    # Speed and bookkeeping only: they do not change the trained weights.
    num_threads: int | None = Field(
        default=None, json_schema_extra=NOT_IN_KEY, description="torch CPU threads (None = torch's default)"
    )
    device: str | None = Field(
        default=None, json_schema_extra=NOT_IN_KEY, description="None = cuda if available"
    )
    logging_steps: int = Field(default=1, json_schema_extra=NOT_IN_KEY, description="log every N steps")
    save_steps: int = Field(default=50, json_schema_extra=NOT_IN_KEY, description="checkpoint every N steps")
    launcher: Literal["auto", "inline", "accelerate"] = Field(
        default="auto",
        json_schema_extra=NOT_IN_KEY,
        description="auto = in this process for num_gpus 1, `accelerate launch` above",
    )


class EvalConfig(StrictModel):
    split: Literal["test"] = Field(default="test", description="only held-out problems are evaluated")
    per_stratum: int | None = Field(
        default=None,
        ge=1,
        description="problems per sampling stratum (source and its own difficulty level: MATH level, "
        "GSM8K solution steps, SVAMP operators); None = every held-out problem",
    )
    max_new_tokens: int = Field(default=512, description="generation budget per problem")
    batch_size: int = Field(
        default=16, json_schema_extra=NOT_IN_KEY, description="prompts per generate() batch"
    )
    backend: ModelBackend = Field(default="transformers", description="a backend that loads a model")
    compare_base: bool = Field(default=True, description="also evaluate the base model on the same problems")
    seed: int = Field(default=0, description="decoding seed")
    vllm: VLLMEngineConfig = Field(
        default_factory=VLLMEngineConfig, json_schema_extra=NOT_IN_KEY, description="vllm: engine settings"
    )
