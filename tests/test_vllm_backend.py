"""The vllm backend without vLLM: vLLM cannot be installed or run on these CPU machines.

What needs no engine is tested for real (config validation, adapter ranks, engine and sampling
arguments, environment flags). What talks to the engine is tested against `FakeVLLM`, a stand-in
`vllm` module (a mock, named as such): its `LLM` records how it is called and answers each
request with token ids that are a pure function of (prompt ids, seed, adapter), as a
deterministic engine would; its tokenizer is the tiny model's real one. The real engine runs in
`benchmarks/vllm_check.py` on the GPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import types
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from glyph_core.config import EvalConfig, GenerateConfig, TeacherConfig, VLLMEngineConfig
from glyph_core.errors import GlyphError
from glyph_core.prompts import messages_for
from glyph_core.teachers.base import GenRequest
from glyph_core.teachers.vllm_backend import (
    adapter_rank,
    engine_env,
    engine_kwargs,
    lora_rank_setting,
    request_seed,
    sampling_kwargs,
)
from tests import fixtures_models as fm

tiny_model = fm.tiny_model

# -- configuration (no engine) -----------------------------------------------------------------


def test_engine_config_errors_name_the_field() -> None:
    for kw, field in (
        ({"gpu_memory_utilization": 1.2}, "vllm.gpu_memory_utilization"),
        ({"gpu_memory_utilization": 0}, "vllm.gpu_memory_utilization"),
        ({"tensor_parallel_size": 0}, "vllm.tensor_parallel_size"),
        ({"max_model_len": 10}, "vllm.max_model_len"),
        ({"max_lora_rank": 12}, "vllm.max_lora_rank"),
        ({"gpu_mem": 0.5}, "vllm.gpu_mem"),
    ):
        with pytest.raises(ValidationError) as err:
            EvalConfig(vllm=kw)
        assert field in str(err.value), kw
    with pytest.raises(ValidationError, match="teacher.vllm.enforce_eager"):
        GenerateConfig(teacher={"vllm": {"enforce_eager": "sometimes"}})


def test_engine_settings_stay_out_of_cache_keys() -> None:
    """Speed and memory settings never change what is generated (a prompt too long for
    max_model_len is an error, not a shorter completion), so they leave the keys alone."""
    plain = TeacherConfig(backend="vllm")
    tuned = TeacherConfig(
        backend="vllm",
        vllm=VLLMEngineConfig(gpu_memory_utilization=0.5, max_model_len=2048, enforce_eager=True),
        adapters=["/some/adapter"],
    )
    assert plain.key_dump() == tuned.key_dump()
    assert EvalConfig().key_dump() == EvalConfig(vllm={"tensor_parallel_size": 2}).key_dump()
    assert "vllm" not in EvalConfig().key_dump()


def test_defaults_fit_one_80gb_gpu_and_a_7b_model() -> None:
    eng = VLLMEngineConfig()
    assert eng.tensor_parallel_size == 1 and 0.8 <= eng.gpu_memory_utilization <= 0.95
    assert not eng.multiprocessing and not eng.flashinfer_sampler  # the lent H100's flags
    assert engine_env(eng) == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_USE_FLASHINFER_SAMPLER": "0",
        "VLLM_BATCH_INVARIANT": "0",
    }


def _adapter(tmp_path: Path, name: str = "adapter", **cfg: Any) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, **cfg}))
    return d


def test_adapter_rank_read_and_rounded_to_what_vllm_serves(tmp_path: Path) -> None:
    assert adapter_rank(_adapter(tmp_path, "a", r=16)) == 16
    assert adapter_rank(_adapter(tmp_path, "b", r=8, rank_pattern={"q_proj": 24})) == 24
    assert lora_rank_setting([24], None) == 32  # vLLM accepts 1, 8, 16, 32, ...
    assert lora_rank_setting([16, 8], None) == 16
    assert lora_rank_setting([16], 64) == 64
    with pytest.raises(GlyphError, match="below the adapters' rank 16"):
        lora_rank_setting([16], 8)
    with pytest.raises(GlyphError, match="largest vLLM serves"):
        lora_rank_setting([1024], None)
    with pytest.raises(GlyphError, match="DoRA"):
        adapter_rank(_adapter(tmp_path, "c", use_dora=True))
    with pytest.raises(GlyphError, match="positive integers"):
        adapter_rank(_adapter(tmp_path, "d", r=None))
    with pytest.raises(GlyphError, match="unreadable"):
        adapter_rank(tmp_path / "missing")


def test_engine_kwargs_enable_lora_only_with_adapters(tmp_path: Path) -> None:
    cfg = TeacherConfig(backend="vllm", model="m", dtype="bfloat16", vllm={"max_model_len": 4096})
    kw = engine_kwargs(cfg, "/models/m")
    assert kw["model"] == "/models/m" and kw["max_model_len"] == 4096 and kw["dtype"] == "bfloat16"
    assert "enable_lora" not in kw
    a = _adapter(tmp_path, r=24)
    kw = engine_kwargs(cfg.model_copy(update={"adapters": [str(a)]}), "/models/m")
    assert (kw["enable_lora"], kw["max_loras"], kw["max_lora_rank"]) == (True, 1, 32)


def test_sampling_kwargs_per_request_seed_and_greedy_n() -> None:
    sampled = TeacherConfig(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=3)
    kw = sampling_kwargs(sampled, "q1", 4, [2])
    assert kw["n"] == 4 and kw["seed"] == request_seed(3, "q1") and kw["stop_token_ids"] == [2]
    assert kw["detokenize"] is False  # decoded by the backend, as the transformers backend does
    assert sampling_kwargs(sampled, "q2", 4, [2])["seed"] != kw["seed"]
    greedy = sampling_kwargs(TeacherConfig(temperature=0.0), "q1", 4, [2])
    assert greedy["n"] == 1 and greedy["temperature"] == 0.0  # copies, not 4 identical decodes
    assert greedy["seed"] is None
    assert request_seed(0, "gsm8k-1") == request_seed(0, "gsm8k-1") != request_seed(1, "gsm8k-1")


# -- against the fake engine --------------------------------------------------------------------


class FakeVLLM:
    """A stand-in `vllm` package (mock): records engine builds, generate calls and the release
    sequence in `events`."""

    def __init__(self, tokenizer_dir: Path, max_model_len: int = 2048) -> None:
        from transformers import AutoTokenizer

        self.events: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.max_model_len = max_model_len
        fake = self

        class SamplingParams:
            def __init__(self, **kw: Any) -> None:
                self.kw = kw

        class LoRARequest:
            def __init__(self, lora_name: str, lora_int_id: int, lora_path: str) -> None:
                self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

        class EngineCore:
            def shutdown(self) -> None:
                fake.events.append("engine_core.shutdown")

        class LLM:
            def __init__(self, **kw: Any) -> None:
                fake.events.append("LLM()")
                fake.engine_kwargs = kw
                fake.env_at_start = {
                    k: v for k, v in __import__("os").environ.items() if k.startswith("VLLM_")
                }
                self.llm_engine = types.SimpleNamespace(
                    engine_core=EngineCore(),
                    model_config=types.SimpleNamespace(max_model_len=fake.max_model_len),
                )

            def get_tokenizer(self) -> Any:
                return fake.tokenizer

            def generate(self, prompts: list[dict[str, Any]], params: list[Any], **kw: Any) -> list[Any]:
                fake.calls.append({"prompts": prompts, "params": [p.kw for p in params], **kw})
                lora = kw.get("lora_request")
                return [
                    fake.answer(p["prompt_token_ids"], sp.kw, lora)
                    for p, sp in zip(prompts, params, strict=True)
                ]

            def __del__(self) -> None:
                fake.events.append("LLM deleted")

        def cleanup_dist_env_and_memory() -> None:
            fake.events.append("cleanup_dist_env_and_memory")

        self.module = types.ModuleType("vllm")
        self.module.LLM = LLM  # type: ignore[attr-defined]
        self.module.SamplingParams = SamplingParams  # type: ignore[attr-defined]
        lora_mod = types.ModuleType("vllm.lora.request")
        lora_mod.LoRARequest = LoRARequest  # type: ignore[attr-defined]
        ps = types.ModuleType("vllm.distributed.parallel_state")
        ps.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory  # type: ignore[attr-defined]
        self.modules = {
            "vllm": self.module,
            "vllm.lora": types.ModuleType("vllm.lora"),
            "vllm.lora.request": lora_mod,
            "vllm.distributed": types.ModuleType("vllm.distributed"),
            "vllm.distributed.parallel_state": ps,
        }

    def answer(self, prompt_ids: list[int], params: dict[str, Any], lora: Any) -> Any:
        """Token ids from (prompt, seed, sample index, adapter): what a deterministic engine does.
        Sample k of n uses seed + k, as vLLM does, greedy decoding no seed; every 3rd prompt
        stops early at eos."""
        eos = self.tokenizer.eos_token_id
        outs = []
        for k in range(params["n"]):
            seed = None if params["temperature"] == 0 else params["seed"] + k  # greedy ignores seeds
            key = f"{prompt_ids}|{seed}|{getattr(lora, 'lora_name', None)}"
            h = hashlib.sha256(key.encode()).digest()
            ids = [1000 + b for b in h[: params["max_tokens"]]]
            reason = "length"
            if len(prompt_ids) % 3 == 0:
                ids = [*ids[:3], eos]
                reason = "stop"
            outs.append(types.SimpleNamespace(token_ids=ids, finish_reason=reason))
        return types.SimpleNamespace(prompt_token_ids=prompt_ids, outputs=outs)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> FakeVLLM:
    fake = FakeVLLM(tiny_model)
    for name, mod in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for var in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_USE_FLASHINFER_SAMPLER", "VLLM_BATCH_INVARIANT"):
        monkeypatch.setenv(var, "unset-by-test")
    return fake


QUESTIONS = [
    "What is 2 + 3?",
    "Compute 7 * 8.",
    "A farmer has 12 cows and buys 30 more. How many?",
    "Half of 9?",
]


def _reqs() -> list[GenRequest]:
    return [GenRequest(f"q{i}", messages_for("latent", q)) for i, q in enumerate(QUESTIONS)]


def _teacher(model: Path, **kw: Any) -> Any:
    from glyph_core.teachers.vllm_backend import VLLMTeacher

    return VLLMTeacher(TeacherConfig(backend="vllm", model=str(model), **{"max_new_tokens": 8, **kw}))


def test_requests_are_token_ids_of_the_chat_template_without_special_tokens(
    fake_vllm: FakeVLLM, tiny_model: Path
) -> None:
    teacher = _teacher(tiny_model, temperature=0.0)
    assert fake_vllm.env_at_start["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # set before the engine
    assert fake_vllm.env_at_start["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    out = teacher.generate(_reqs(), n=2)
    [call] = fake_vllm.calls
    tok = fake_vllm.tokenizer
    for req, prompt in zip(_reqs(), call["prompts"], strict=True):
        text = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        assert prompt["prompt_token_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert [p["seed"] for p in call["params"]] == [None] * len(QUESTIONS)  # greedy: no generator
    assert call["lora_request"] is None
    assert [len(c) for c in out] == [2, 2, 2, 2] and all(c[0] == c[1] for c in out)  # greedy copies
    for comps, prompt in zip(out, call["prompts"], strict=True):
        c = comps[0]
        assert c.prompt_tokens == len(prompt["prompt_token_ids"])
        if c.finish_reason == "stop":  # cut at eos, eos counted, text decoded by the backend
            assert c.completion_tokens == 4 and tok.eos_token not in c.text
        else:
            assert c.completion_tokens == 8


def test_adapter_requests_carry_the_lora_request_and_base_requests_none(
    fake_vllm: FakeVLLM, tiny_model: Path, tmp_path: Path
) -> None:
    adapter = _adapter(tmp_path, r=16, base_model_name_or_path=str(tiny_model))
    teacher = _teacher(tiny_model, temperature=0.0, adapters=[str(adapter)])
    assert fake_vllm.engine_kwargs["enable_lora"] is True and fake_vllm.engine_kwargs["max_lora_rank"] == 16
    base = teacher.generate(_reqs(), n=1)
    tuned = teacher.generate(_reqs(), n=1, adapter=str(adapter))
    assert fake_vllm.calls[0]["lora_request"] is None
    lora = fake_vllm.calls[1]["lora_request"]
    assert (lora.lora_int_id, lora.lora_path) == (1, str(adapter))
    assert [c[0].text for c in base] != [c[0].text for c in tuned]
    assert fake_vllm.events.count("LLM()") == 1  # one engine for both
    with pytest.raises(GlyphError, match="not one this engine was built with"):
        teacher.generate(_reqs(), n=1, adapter=str(tmp_path / "other"))


def test_adapter_checks_run_before_the_engine_starts(
    fake_vllm: FakeVLLM, tiny_model: Path, tmp_path: Path
) -> None:
    dora = _adapter(tmp_path, use_dora=True)
    with pytest.raises(GlyphError, match="DoRA"):
        _teacher(tiny_model, adapters=[str(dora)])
    merged = tmp_path / "merged"
    merged.mkdir()
    with pytest.raises(GlyphError, match="unreadable"):
        _teacher(tiny_model, adapters=[str(merged)])
    assert "LLM()" not in fake_vllm.events


def test_prompt_too_long_for_the_context_is_an_error_not_a_short_completion(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path
) -> None:
    fake = FakeVLLM(tiny_model, max_model_len=60)  # the prompts here are 48 to 60 tokens long
    for name, mod in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    teacher = _teacher(tiny_model, temperature=0.0, max_new_tokens=8)
    out = teacher.generate(_reqs(), n=2)
    [call] = fake.calls
    sent = [len(p["prompt_token_ids"]) for p in call["prompts"]]
    assert sent and all(n + 8 <= 60 for n in sent)  # only prompts that fit reached the engine
    errors = [c for c in out if c[0].finish_reason == "error"]
    assert len(errors) == len(out) - len(sent) >= 1
    assert all(len(c) == 2 and c[0].error.startswith("PromptTooLong") for c in errors)


def test_samples_do_not_depend_on_batch_composition(fake_vllm: FakeVLLM, tiny_model: Path) -> None:
    """A shard regenerated alone (a resumed run) gets the same bytes as in the original run, where
    other shards' requests shared the engine: every field depends on its own request only."""
    from glyph_core.generate import generate_shard

    cfg = GenerateConfig(teacher=TeacherConfig(backend="vllm", model=str(tiny_model), n=3, temperature=0.8))
    problems = [{"id": f"p{i}", "question": q} for i, q in enumerate(QUESTIONS)]
    teacher = _teacher(tiny_model, n=3, temperature=0.8)
    whole = generate_shard(teacher, problems, cfg)
    alone = generate_shard(teacher, problems[2:], cfg)
    assert whole.slice(2 * 3).equals(alone)

    def parquet(table: Any) -> bytes:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()

    fresh = _teacher(tiny_model, n=3, temperature=0.8)  # a new engine after a kill
    assert parquet(generate_shard(fresh, problems[2:], cfg)) == parquet(alone)
    samples = [r["completion"] for r in whole.to_pylist() if r["id"] == "p0"]
    assert len(set(samples)) == 3  # seed + k per sample


def test_close_releases_the_engine_in_order(fake_vllm: FakeVLLM, tiny_model: Path) -> None:
    import gc

    teacher = _teacher(tiny_model)
    teacher.close()
    gc.collect()
    assert fake_vllm.events == ["LLM()", "engine_core.shutdown", "LLM deleted", "cleanup_dist_env_and_memory"]
    teacher.close()  # idempotent
    assert fake_vllm.events.count("cleanup_dist_env_and_memory") == 1
    with pytest.raises(GlyphError, match="closed"):
        teacher.generate(_reqs(), n=1)


def test_engine_failure_becomes_error_completions(fake_vllm: FakeVLLM, tiny_model: Path) -> None:
    teacher = _teacher(tiny_model)

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access")

    teacher.llm.generate = boom
    out = teacher.generate(_reqs()[:2], n=2)
    assert [[c.finish_reason for c in comps] for comps in out] == [["error", "error"]] * 2
    assert out[0][0].error.startswith("RuntimeError: CUDA error")


def test_engine_args_pass_through_but_cannot_override_typed_fields() -> None:
    cfg = TeacherConfig(backend="vllm", model="m", vllm={"engine_args": {"load_format": "dummy"}})
    assert engine_kwargs(cfg, "/m")["load_format"] == "dummy"
    for clash in ({"max_model_len": 4096}, {"enable_lora": False}, {"seed": 3}):
        bad = TeacherConfig(backend="vllm", model="m", vllm={"engine_args": clash})
        with pytest.raises(GlyphError, match="set through their own fields"):
            engine_kwargs(bad, "/m")
