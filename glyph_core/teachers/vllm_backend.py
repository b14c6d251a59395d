"""The vLLM backend: in-process offline generation, the production default on GPU hosts.

Kept thin on purpose: vLLM is an optional extra (a large wheel pinning its own torch), cannot
run on the CPU machines where tests run, and its API moves between releases. It uses only the
stable surface: `LLM(...)`, `llm.get_tokenizer().apply_chat_template`, `LLM.generate(prompts,
[SamplingParams(n=...), ...])`, and `RequestOutput.outputs[k].{text, token_ids, finish_reason}`.
Each request gets its own seed (config seed + request id hash), so a resumed run or a shard
generated in a different batch samples the same completions.
"""

from __future__ import annotations

import hashlib
from typing import Any

from glyph_core.config import TeacherConfig
from glyph_core.errors import GlyphError
from glyph_core.models import resolve_model
from glyph_core.teachers.base import Completion, GenRequest


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise GlyphError(
            "the vllm backend needs vLLM: `pip install 'glyph-pipeline[vllm]'` on a GPU host, "
            "or use backend=transformers"
        ) from exc
    return vllm


def request_seed(seed: int, request_id: str) -> int:
    h = hashlib.sha256(f"{seed}\x00{request_id}".encode()).digest()
    return int.from_bytes(h[:4], "little")


class VLLMTeacher:
    def __init__(self, cfg: TeacherConfig) -> None:
        vllm = _import_vllm()
        self.cfg = cfg
        self.name = f"vllm:{cfg.model}"
        self._SamplingParams = vllm.SamplingParams
        kwargs: dict[str, Any] = {
            "model": resolve_model(cfg.model),
            "dtype": cfg.dtype,
            "seed": cfg.seed,
            "trust_remote_code": cfg.trust_remote_code,
        }
        if cfg.revision:
            kwargs["revision"] = cfg.revision
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, requests: list[GenRequest], n: int = 1) -> list[list[Completion]]:
        cfg = self.cfg
        prompts = [
            self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
            for r in requests
        ]
        greedy = cfg.temperature <= 0
        params = [
            self._SamplingParams(
                n=n,
                temperature=0.0 if greedy else cfg.temperature,
                top_p=1.0 if greedy else cfg.top_p,
                max_tokens=cfg.max_new_tokens,
                seed=request_seed(cfg.seed, r.id),
            )
            for r in requests
        ]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # keep the shard alive; the stage retries and counts errors
            err = f"{type(exc).__name__}: {exc}"[:500]
            return [[Completion("", "error", 0, 0, error=err) for _ in range(n)] for _ in requests]
        results: list[list[Completion]] = []
        for out in outputs:  # vLLM returns outputs in prompt order
            prompt_tokens = len(out.prompt_token_ids or [])
            comps = [
                Completion(
                    o.text,
                    o.finish_reason if o.finish_reason in ("stop", "length") else "error",
                    prompt_tokens,
                    len(o.token_ids),
                    error=None
                    if o.finish_reason in ("stop", "length")
                    else f"vllm finish_reason={o.finish_reason}",
                )
                for o in out.outputs
            ]
            results.append(comps)
        return results

    def close(self) -> None:
        self.llm = None
