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

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from glyph_core.errors import SettingError

Bucket = Literal["easy", "medium", "hard"]
BUCKETS: tuple[Bucket, ...] = ("easy", "medium", "hard")


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

    name: Literal["gsm8k", "svamp", "math"]
    local_dir: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    revision: str | None = None


class UnifyConfig(StrictModel):
    data_dir: str | None = Field(
        default=None, description="Folder in the layout of ../shared/data; None means the Hub."
    )
    sources: list[Literal["gsm8k", "svamp", "math"]] = Field(default=["gsm8k", "svamp", "math"], min_length=1)
    svamp_holdout: NonNegInt = 300
    # Subsampling for small profiles; applied after the split, deterministic by id hash.
    max_train_per_source: Count | None = None
    max_test_per_source: Count | None = None
    seed: Seed = 0


class TeacherConfig(StrictModel):
    backend: Literal["reference", "transformers", "openai", "vllm"] = "reference"
    model: Name = "Qwen/Qwen2.5-7B-Instruct"
    revision: str | None = None
    prompt: Literal["glyph", "latent", "natural"] = "glyph"
    n: Count = 1
    temperature: Annotated[float, Field(ge=0)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    max_new_tokens: Count = 512
    seed: Seed = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    # Throughput knobs: they change speed, not what is generated, so they stay out of the key.
    batch_size: Count = Field(default=8, json_schema_extra=NOT_IN_KEY)
    base_url: str | None = Field(default=None, json_schema_extra=NOT_IN_KEY)
    api_key_env: str = Field(default="OPENAI_API_KEY", json_schema_extra=NOT_IN_KEY)
    concurrency: Count = Field(default=8, json_schema_extra=NOT_IN_KEY)
    timeout_s: Positive = Field(default=120.0, json_schema_extra=NOT_IN_KEY)
    max_retries: NonNegInt = Field(default=4, json_schema_extra=NOT_IN_KEY)
    device: str | None = Field(default=None, json_schema_extra=NOT_IN_KEY)

    @model_validator(mode="after")
    def _endpoint_given(self) -> TeacherConfig:
        if self.backend == "openai" and not self.base_url:
            raise _setting_error(
                "base_url", self.base_url, "required by backend 'openai' (http://host:8000/v1)"
            )
        return self


class GenerateConfig(StrictModel):
    teacher: TeacherConfig = TeacherConfig()
    split: Literal["train"] = "train"
    limit: Count | None = None
    shard_size: Count = 64
    # Fan-out over GPU workers (flows/fanout.py): shards are keyed on content, so how many
    # workers generated them changes speed, never the output.
    workers: Count = Field(
        default=1, json_schema_extra=NOT_IN_KEY, description="shard groups generated in parallel"
    )
    # Whether a result exists, not what it contains: out of the key, so raising it after a
    # failed run reuses every shard that run generated.
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.02,
        json_schema_extra=NOT_IN_KEY,
        description="the stage fails (publishing nothing) when a larger share of completions are errors",
    )


class FilterConfig(StrictModel):
    max_completion_tokens: Count = 1024
    workers: NonNegInt = Field(
        default=0, json_schema_extra=NOT_IN_KEY, description="0 = one process per core"
    )


class RewriteConfig(StrictModel):
    glyph_min_bucket: Bucket = "hard"
    natural_ratio: Annotated[float, Field(ge=0)] = Field(
        default=0.5, description="natural rows per glyph row"
    )
    seed: Seed = 0


class LoraConfig(StrictModel):
    r: Count = 16
    alpha: Count = 32
    dropout: Fraction = 0.05
    target_modules: Annotated[list[Name], Field(min_length=1)] | Name = "all-linear"


class TrainConfig(StrictModel):
    base_model: Name = "Qwen/Qwen2.5-7B-Instruct"
    revision: str | None = None
    method: Literal["lora", "full"] = "lora"
    lora: LoraConfig = LoraConfig()
    epochs: Annotated[float, Field(ge=0)] = 2.0
    max_steps: Annotated[int, Field(ge=-1)] = Field(default=-1, description="-1 = train for `epochs`")
    learning_rate: Positive = 2e-4
    batch_size: Count = Field(
        default=4, description="per device: the global batch is batch_size x grad_accum x num_gpus"
    )
    grad_accum: Count = 4
    # Data-parallel processes (glyph_core/launch.py). It changes the global batch, hence the
    # trained weights, so it stays in the cache key.
    num_gpus: int = Field(default=1, ge=1, description="> 1 trains through `accelerate launch`")
    max_seq_len: SeqLen = 1024
    packing: bool = False
    padding_free: bool = False
    gradient_checkpointing: bool = False
    bf16: Literal["auto", "on", "off"] = "auto"
    merge: bool = False
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: Fraction = 0.0
    seed: Seed = 0
    trust_remote_code: bool = False
    # Speed and bookkeeping only: they do not change the trained weights.
    num_threads: Count | None = Field(default=None, json_schema_extra=NOT_IN_KEY)
    device: str | None = Field(
        default=None, json_schema_extra=NOT_IN_KEY, description="None = cuda if available"
    )
    logging_steps: Count = Field(default=1, json_schema_extra=NOT_IN_KEY)
    save_steps: Count = Field(
        default=50, json_schema_extra=NOT_IN_KEY, description="checkpoint every N steps"
    )
    launcher: Literal["auto", "inline", "accelerate"] = Field(
        default="auto",
        json_schema_extra=NOT_IN_KEY,
        description="auto = in this process for num_gpus 1, `accelerate launch` above",
    )

    @model_validator(mode="after")
    def _trains_something(self) -> TrainConfig:
        """`epochs=0` with `max_steps=-1` would publish an untrained adapter as "tuned"."""
        if self.max_steps == 0:
            raise _setting_error("max_steps", 0, "must be -1 (train for `epochs`) or >= 1")
        if self.max_steps == -1 and self.epochs <= 0:
            raise _setting_error("epochs", self.epochs, "must be > 0 when max_steps=-1 (train for `epochs`)")
        return self


class EvalConfig(StrictModel):
    split: Literal["test"] = "test"
    per_bucket: Count | None = Field(default=None, description="problems per (source, bucket); None = all")
    max_new_tokens: Count = 512
    batch_size: Count = Field(default=16, json_schema_extra=NOT_IN_KEY)
    backend: Literal["transformers", "vllm"] = "transformers"
    compare_base: bool = True
    seed: Seed = 0
