"""Stage configurations as pydantic models.

Each stage's config is hashed into its cache key (`storage.stage_key`), so every field here
that changes a stage's output must live in that stage's model, and nothing that does not
(paths of the store, worker counts that do not change results are marked `json_schema_extra=NOT_IN_KEY`).
Unknown keys are errors: a typo in `--set` must not silently run the default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Bucket = Literal["easy", "medium", "hard"]
BUCKETS: tuple[Bucket, ...] = ("easy", "medium", "hard")


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
    sources: list[Literal["gsm8k", "svamp", "math"]] = ["gsm8k", "svamp", "math"]
    svamp_holdout: int = 300
    # Subsampling for small profiles; applied after the split, deterministic by id hash.
    max_train_per_source: int | None = None
    max_test_per_source: int | None = None
    seed: int = 0


class TeacherConfig(StrictModel):
    backend: Literal["reference", "transformers", "openai", "vllm"] = "reference"
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    revision: str | None = None
    prompt: Literal["glyph", "latent", "natural"] = "glyph"
    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    # Throughput knobs: they change speed, not what is generated, so they stay out of the key.
    batch_size: int = Field(default=8, json_schema_extra=NOT_IN_KEY)
    base_url: str | None = Field(default=None, json_schema_extra=NOT_IN_KEY)
    api_key_env: str = Field(default="OPENAI_API_KEY", json_schema_extra=NOT_IN_KEY)
    concurrency: int = Field(default=8, json_schema_extra=NOT_IN_KEY)
    timeout_s: float = Field(default=120.0, json_schema_extra=NOT_IN_KEY)
    max_retries: int = Field(default=4, json_schema_extra=NOT_IN_KEY)
    device: str | None = Field(default=None, json_schema_extra=NOT_IN_KEY)


class GenerateConfig(StrictModel):
    teacher: TeacherConfig = TeacherConfig()
    split: Literal["train"] = "train"
    limit: int | None = None
    shard_size: int = 64
    # Fan-out over GPU workers (flows/fanout.py): shards are keyed on content, so how many
    # workers generated them changes speed, never the output.
    workers: int = Field(
        default=1, json_schema_extra=NOT_IN_KEY, description="shard groups generated in parallel"
    )


class FilterConfig(StrictModel):
    max_completion_tokens: int = 1024
    workers: int = Field(default=0, json_schema_extra=NOT_IN_KEY, description="0 = one process per core")


class RewriteConfig(StrictModel):
    glyph_min_bucket: Bucket = "hard"
    natural_ratio: float = Field(default=0.5, description="natural rows per glyph row")
    seed: int = 0


class LoraConfig(StrictModel):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


class TrainConfig(StrictModel):
    base_model: str = "Qwen/Qwen2.5-7B-Instruct"
    revision: str | None = None
    method: Literal["lora", "full"] = "lora"
    lora: LoraConfig = LoraConfig()
    epochs: float = 2.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    batch_size: int = Field(
        default=4, description="per device: the global batch is batch_size x grad_accum x num_gpus"
    )
    grad_accum: int = 4
    # Data-parallel processes (glyph_core/launch.py). It changes the global batch, hence the
    # trained weights, so it stays in the cache key.
    num_gpus: int = Field(default=1, ge=1, description="> 1 trains through `accelerate launch`")
    max_seq_len: int = 1024
    packing: bool = False
    padding_free: bool = False
    gradient_checkpointing: bool = False
    bf16: Literal["auto", "on", "off"] = "auto"
    merge: bool = False
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.0
    seed: int = 0
    trust_remote_code: bool = False
    # Speed and bookkeeping only: they do not change the trained weights.
    num_threads: int | None = Field(default=None, json_schema_extra=NOT_IN_KEY)
    device: str | None = Field(
        default=None, json_schema_extra=NOT_IN_KEY, description="None = cuda if available"
    )
    logging_steps: int = Field(default=1, json_schema_extra=NOT_IN_KEY)
    save_steps: int = Field(default=50, json_schema_extra=NOT_IN_KEY, description="checkpoint every N steps")
    launcher: Literal["auto", "inline", "accelerate"] = Field(
        default="auto",
        json_schema_extra=NOT_IN_KEY,
        description="auto = in this process for num_gpus 1, `accelerate launch` above",
    )


class EvalConfig(StrictModel):
    split: Literal["test"] = "test"
    per_stratum: int | None = Field(
        default=None,
        ge=1,
        description="problems per sampling stratum (source and its own difficulty level: MATH level, "
        "GSM8K solution steps, SVAMP operators); None = every held-out problem",
    )
    # Transitional: the old name, still passed by `glyph evaluate --per-bucket`. Mapped onto
    # per_stratum, never hashed or dumped; delete it when the CLI passes per_stratum.
    per_bucket: int | None = Field(default=None, ge=1, exclude=True, json_schema_extra=NOT_IN_KEY)
    max_new_tokens: int = 512
    batch_size: int = Field(default=16, json_schema_extra=NOT_IN_KEY)
    backend: Literal["transformers", "vllm"] = "transformers"
    compare_base: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _per_bucket_is_per_stratum(self) -> EvalConfig:
        if self.per_bucket is not None:
            if self.per_stratum not in (None, self.per_bucket):
                raise ValueError("per_bucket is the old name of per_stratum: give one of them")
            self.per_stratum, self.per_bucket = self.per_bucket, None
        return self
