"""A teacher behind any OpenAI-compatible chat endpoint (`vllm serve`, SGLang, a hosted model).

Why it is built this way:
* One HTTP request per sample (`n=1`), run concurrently on a thread pool. Not every server
  implements `n` (several ignore it), and a response with `n>1` reports only the summed token
  usage; one request per sample gives exact per-sample token counts on every server. Servers
  with prefix caching (vLLM, SGLang) serve the repeated prompt from cache.
* Each sample `k` is sent with `seed + k` (servers that honour seeds then return distinct but
  reproducible samples).
* Retries with exponential backoff on 408/409/429/5xx and connection errors are the `openai`
  client's own (`max_retries`), with our timeout per request. What still fails (a timeout, a
  dropped connection, a 4xx) becomes an error completion naming the exception type, which the
  generate stage retries once per shard and then counts.
* The API key is read from the environment variable named in the config and handed to the
  client only; it is never logged or stored (error texts are the exception type and message,
  which the client builds without the key).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from glyph_core.config import TeacherConfig
from glyph_core.errors import GlyphError
from glyph_core.teachers.base import Completion, GenRequest

log = logging.getLogger(__name__)


def _client(cfg: TeacherConfig) -> Any:
    try:
        from openai import OpenAI
    except ImportError as exc:  # pragma: no cover - a hard dependency in pyproject
        raise GlyphError("the openai backend needs the `openai` package") from exc
    if not cfg.base_url:
        raise GlyphError("the openai backend needs base_url (for example http://localhost:8000/v1)")
    key = os.environ.get(cfg.api_key_env) or "EMPTY"  # local servers accept any key
    return OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=cfg.max_retries)


class OpenAITeacher:
    def __init__(self, cfg: TeacherConfig, client: Any | None = None) -> None:
        self.cfg = cfg
        self.name = f"openai:{cfg.model}"
        self.client = client if client is not None else _client(cfg)
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, cfg.concurrency), thread_name_prefix="openai-teacher"
        )

    def __repr__(self) -> str:  # no key in reprs
        return f"OpenAITeacher(model={self.cfg.model!r}, base_url={self.cfg.base_url!r})"

    def _one(self, req: GenRequest, k: int) -> Completion:
        cfg = self.cfg
        params: dict[str, Any] = {
            "model": cfg.model,
            "messages": req.messages,
            "max_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "seed": cfg.seed + k,
        }
        if cfg.temperature > 0:
            params["top_p"] = cfg.top_p
        try:
            resp = self.client.chat.completions.create(**params)
        except Exception as exc:  # timeouts, dropped connections, exhausted retries, 4xx
            log.warning("request %s sample %d failed: %s", req.id, k, type(exc).__name__)
            return Completion("", "error", 0, 0, error=f"{type(exc).__name__}: {exc}"[:500])
        if not resp.choices:
            return Completion("", "error", 0, 0, error="EmptyResponse: no choices")
        choice = resp.choices[0]
        text = choice.message.content or "" if choice.message is not None else ""
        usage = resp.usage
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        reason = choice.finish_reason or "stop"
        return Completion(text, reason, prompt_tokens, completion_tokens)

    def generate(
        self, requests: list[GenRequest], n: int = 1, adapter: str | None = None
    ) -> list[list[Completion]]:
        if adapter is not None:
            raise GlyphError(f"the openai backend serves no LoRA adapters (got {adapter})")
        futures = [[self._pool.submit(self._one, req, k) for k in range(n)] for req in requests]
        return [[f.result() for f in per] for per in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.client, "close", None)
        if callable(close):
            close()
