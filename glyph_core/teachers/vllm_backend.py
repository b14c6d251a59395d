"""The vLLM backend: in-process offline generation, the production default on GPU hosts.

Why it is built this way:
* One engine per process, and it serves base and tuned together: a LoRA adapter is not a model
  directory for `vllm.LLM(model=...)`, so the engine is built on the base model with
  `enable_lora=True` and `max_lora_rank` read from the adapters' `adapter_config.json`, and
  `generate(..., adapter=dir)` sends a `LoRARequest` for the tuned model while base requests go
  without one. A merged (full) tuned model is a model of its own and gets its own engine, after
  this one is closed.
* `close()` gives the GPU memory back, in the order vLLM 0.25's own tests use: shut the engine
  core down, drop every reference, `cleanup_dist_env_and_memory()` (destroys the model-parallel
  groups and the distributed environment, then `gc.collect()` and `empty_cache()`), and once more
  `gc.collect()` + `torch.cuda.empty_cache()` for what the references held.
* The environment flags vLLM reads at engine start come from the config
  (`VLLMEngineConfig`): `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine core in this process
  (with the subprocess, a smoke test hung for 10 minutes on the lent H100), and
  `VLLM_USE_FLASHINFER_SAMPLER=0` samples with PyTorch when flashinfer is not installed.
* Prompts are rendered with the model's chat template and tokenized here without special
  tokens, exactly as the transformers backend does, and sent as token ids; completions are
  decoded here from the token ids up to the first stop token with `skip_special_tokens=True`.
  The same tokens therefore give the same bytes in both backends, and vLLM's detokenizer is off.
* Every request has its own seed (config seed + request id hash; vLLM gives sample `k` of `n`
  the seed + k), and every field of a completion depends on its own request only, so a shard
  generated again, alone or in another batch, samples the same completions. Bit-identical
  logits across batch compositions need `batch_invariant=True` (VLLM_BATCH_INVARIANT).
* A prompt that leaves less than `max_new_tokens` of the context is an error completion, not a
  completion cut short by the context length: the engine settings never change a result.

vLLM cannot be installed or run on the CPU machines where the tests run: the tests drive this
module with a fake `vllm` module (named as such) and the GPU check (`benchmarks/vllm_check.py`)
runs it for real.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from glyph_core.config import VLLM_LORA_RANKS, TeacherConfig, VLLMEngineConfig
from glyph_core.errors import GlyphError
from glyph_core.models import resolve_model
from glyph_core.teachers.base import Completion, GenRequest

log = logging.getLogger(__name__)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise GlyphError(
            "the vllm backend needs vLLM: `pip install 'glyph-pipeline[vllm]'` on a GPU host "
            "(offline hosts: scripts/offline_wheels.sh), or use backend=transformers"
        ) from exc
    return vllm


def request_seed(seed: int, request_id: str) -> int:
    """The seed of one request: the same for the request wherever and with whatever it runs."""
    h = hashlib.sha256(f"{seed}\x00{request_id}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def engine_env(engine: VLLMEngineConfig) -> dict[str, str]:
    """The environment variables vLLM reads when an engine starts, from the config."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if engine.multiprocessing else "0",
        "VLLM_USE_FLASHINFER_SAMPLER": "1" if engine.flashinfer_sampler else "0",
        "VLLM_BATCH_INVARIANT": "1" if engine.batch_invariant else "0",
    }


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest LoRA rank in an adapter (`r`, or any `rank_pattern` override)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GlyphError(f"{path}: unreadable ({exc})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise GlyphError(f"{path}: peft_type {cfg.get('peft_type')!r}; vLLM serves LoRA adapters only")
    if cfg.get("use_dora"):
        raise GlyphError(f"{path}: a DoRA adapter; vLLM cannot serve it: train with merge=true")
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise GlyphError(f"{path}: field r (and rank_pattern) must be positive integers, got {ranks}")
    return max(ranks)


def lora_rank_setting(ranks: list[int], configured: int | None) -> int:
    """`max_lora_rank` for the engine: the configured one (which must cover every adapter), else
    the smallest rank vLLM accepts that covers them."""
    need = max(ranks)
    if configured is not None:
        if configured < need:
            raise GlyphError(f"vllm.max_lora_rank={configured} is below the adapters' rank {need}")
        return configured
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise GlyphError(
        f"LoRA rank {need} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]}): merge the adapter"
    )


# Arguments this module sets from typed fields; `engine_args` may not set them behind their back.
_MANAGED = {
    "model",
    "dtype",
    "seed",
    "trust_remote_code",
    "revision",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "enforce_eager",
    "max_model_len",
    "max_num_seqs",
    "enable_lora",
    "max_loras",
    "max_lora_rank",
}


def engine_kwargs(cfg: TeacherConfig, model_path: str) -> dict[str, Any]:
    """The `vllm.LLM(...)` arguments for a teacher config (no vLLM import needed)."""
    eng = cfg.vllm
    kwargs: dict[str, Any] = {
        "model": model_path,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        "trust_remote_code": cfg.trust_remote_code,
        "gpu_memory_utilization": eng.gpu_memory_utilization,
        "tensor_parallel_size": eng.tensor_parallel_size,
        "enforce_eager": eng.enforce_eager,
    }
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if eng.max_model_len is not None:
        kwargs["max_model_len"] = eng.max_model_len
    if eng.max_num_seqs is not None:
        kwargs["max_num_seqs"] = eng.max_num_seqs
    clash = sorted(set(eng.engine_args) & (set(kwargs) | _MANAGED))
    if clash:
        raise GlyphError(
            f"vllm.engine_args {clash}: set through their own fields (vllm.*, dtype, seed, adapters)"
        )
    kwargs.update(eng.engine_args)
    if cfg.adapters:
        kwargs["enable_lora"] = True
        kwargs["max_loras"] = len(cfg.adapters)
        kwargs["max_lora_rank"] = lora_rank_setting(
            [adapter_rank(a) for a in cfg.adapters], eng.max_lora_rank
        )
    return kwargs


def sampling_kwargs(cfg: TeacherConfig, request_id: str, n: int, stop_ids: list[int]) -> dict[str, Any]:
    """`SamplingParams(...)` of one request. Greedy decoding asks for one sequence (the `n`
    samples of a greedy request are copies of it, as in the transformers backend) and no seed
    (a seeded request gets its own random generator in vLLM, which greedy decoding never uses)."""
    greedy = cfg.temperature <= 0
    return {
        "n": 1 if greedy else n,
        "temperature": 0.0 if greedy else cfg.temperature,
        "top_p": 1.0 if greedy else cfg.top_p,
        "max_tokens": cfg.max_new_tokens,
        "seed": None if greedy else request_seed(cfg.seed, request_id),  # greedy needs no generator
        "stop_token_ids": stop_ids,
        "detokenize": False,
    }


class VLLMTeacher:
    """A model (and its LoRA adapters) in one in-process vLLM engine."""

    def __init__(self, cfg: TeacherConfig) -> None:
        model_path = resolve_model(cfg.model)
        kwargs = engine_kwargs(cfg, model_path)  # adapter checks before the (slow) engine start
        for adapter in cfg.adapters:
            _check_adapter_base(adapter, cfg.model, model_path)
        os.environ.update(engine_env(cfg.vllm))
        vllm = _import_vllm()
        self.cfg = cfg
        self.name = f"vllm:{cfg.model}"
        self._SamplingParams = vllm.SamplingParams
        self.llm: Any = vllm.LLM(**kwargs)
        self.tokenizer: Any = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.stop_ids = sorted(_stop_ids(model_path, self.tokenizer, cfg.trust_remote_code))
        self._lora: dict[str, Any] = {}
        if cfg.adapters:
            from vllm.lora.request import LoRARequest

            for i, adapter in enumerate(cfg.adapters, 1):
                self._lora[adapter] = LoRARequest(
                    lora_name=f"adapter-{i}", lora_int_id=i, lora_path=str(adapter)
                )

    # -- requests -------------------------------------------------------------------------------
    def prompt_ids(self, requests: list[GenRequest]) -> list[list[int]]:
        """The chat template's text of each request, tokenized without special tokens (in one
        batched call: the fast tokenizer runs it in parallel)."""
        if not requests:
            return []
        texts = [
            self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
            for r in requests
        ]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _completions(self, outputs: list[Any]) -> list[list[Completion]]:
        """Completions of vLLM's `RequestOutput`s: cut at the first stop token (counted), decoded
        with `skip_special_tokens=True` in one batched call."""
        stop = set(self.stop_ids)
        bodies: list[list[int]] = []
        meta: list[tuple[int, str | None, int, int]] = []  # (request, finish_reason, prompt, tokens)
        for i, out in enumerate(outputs):
            prompt_tokens = len(out.prompt_token_ids or [])
            for o in out.outputs:
                ids = list(o.token_ids)
                cut = next((j for j, t in enumerate(ids) if t in stop), None)
                bodies.append(ids if cut is None else ids[:cut])
                meta.append((i, o.finish_reason, prompt_tokens, len(ids) if cut is None else cut + 1))
        texts = self.tokenizer.batch_decode(bodies, skip_special_tokens=True) if bodies else []
        results: list[list[Completion]] = [[] for _ in outputs]
        for (i, reason, prompt_tokens, n_tokens), text in zip(meta, texts, strict=True):
            if reason in ("stop", "length"):
                results[i].append(Completion(text, reason, prompt_tokens, n_tokens))
            else:
                err = f"vllm finish_reason={reason}"
                results[i].append(Completion("", "error", prompt_tokens, n_tokens, error=err))
        return results

    def generate(
        self, requests: list[GenRequest], n: int = 1, adapter: str | None = None
    ) -> list[list[Completion]]:
        if self.llm is None:
            raise GlyphError("this vLLM teacher is closed")
        lora = None
        if adapter is not None:
            lora = self._lora.get(adapter)
            if lora is None:
                raise GlyphError(
                    f"adapter {adapter} is not one this engine was built with ({list(self._lora)})"
                )
        cfg = self.cfg
        results: list[list[Completion] | None] = [None] * len(requests)
        prompts: list[dict[str, Any]] = []
        params: list[Any] = []
        index: list[int] = []
        for i, (r, ids) in enumerate(zip(requests, self.prompt_ids(requests), strict=True)):
            if len(ids) + cfg.max_new_tokens > self.max_model_len:
                err = (
                    f"PromptTooLong: {len(ids)} prompt tokens + max_new_tokens {cfg.max_new_tokens} "
                    f"> max_model_len {self.max_model_len}"
                )
                results[i] = [Completion("", "error", len(ids), 0, error=err) for _ in range(n)]
                continue
            prompts.append({"prompt_token_ids": ids})
            params.append(self._SamplingParams(**sampling_kwargs(cfg, r.id, n, self.stop_ids)))
            index.append(i)
        if prompts:
            try:
                outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
            except Exception as exc:  # keep the shard alive; the stage retries and counts errors
                log.exception("vLLM generate failed for %d requests", len(prompts))
                err = f"{type(exc).__name__}: {exc}"[:500]
                outputs = None
                for i in index:
                    results[i] = [Completion("", "error", 0, 0, error=err) for _ in range(n)]
            if outputs is not None:
                if len(outputs) != len(prompts):
                    raise GlyphError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
                for i, comps in zip(index, self._completions(outputs), strict=True):  # prompt order
                    results[i] = comps * n if cfg.temperature <= 0 else comps
        return [r if r is not None else [] for r in results]

    # -- memory ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Shut the engine down and give its GPU memory back (see the module docstring)."""
        if self.llm is None:
            return
        self.tokenizer = None
        self._lora = {}
        shutdown_engine(self.llm)
        self.llm = None  # the last reference: the engine's tensors become garbage here
        free_gpu_memory()


def shutdown_engine(llm: Any) -> None:
    """Stop one `vllm.LLM`'s engine core (in-process: its executor and workers; with
    multiprocessing: the core's process). Drop every reference to `llm` afterwards, then call
    :func:`free_gpu_memory`."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # the memory is freed regardless
            log.warning("vLLM engine core shutdown raised", exc_info=True)


def free_gpu_memory() -> None:
    """After the last reference to an engine is gone: vLLM's own teardown (model-parallel groups,
    the distributed environment, gc, the CUDA cache), then gc and the CUDA cache once more for
    what the dropped references held."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_adapter_base(adapter: str, base: str, base_path: str) -> None:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise GlyphError(f"{adapter}: no adapter_config.json (a merged model is served as its own model)")
    recorded = json.loads(path.read_text()).get("base_model_name_or_path")
    if recorded and recorded not in (base, base_path) and resolve_model(recorded) != base_path:
        log.warning("adapter %s records base %r; serving it on %s", adapter, recorded, base_path)


def _stop_ids(model_path: str, tokenizer: Any, trust_remote_code: bool = False) -> set[int]:
    """The eos ids of the model's config, its generation config and its tokenizer: the set the
    transformers backend stops at, so that both backends stop at the same tokens."""
    from transformers import AutoConfig, GenerationConfig

    from glyph_core.teachers.hf import eos_ids

    sources: list[Any] = []
    with contextlib.suppress(OSError):  # no generation_config.json
        sources.append(GenerationConfig.from_pretrained(model_path))
    with contextlib.suppress(OSError, ValueError):
        sources.append(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code))
    return eos_ids(sources, tokenizer)
