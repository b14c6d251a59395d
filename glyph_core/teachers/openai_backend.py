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
* Every wait is bounded: connecting by `CONNECT_TIMEOUT_S`, a reply by `timeout_s` (it must
  cover a whole non-streamed generation), attempts by `max_retries`. Before the first request
  the teacher asks the endpoint which models it serves (`GET /models`, `PROBE_TIMEOUT_S`, one
  retry), so a dead, silent or wrong endpoint, or a refused key, fails at once with one line
  naming the endpoint, instead of as thousands of error completions.
* The teacher's `name`, which the generate stage writes into every row, is the model the
  endpoint reports serving: vLLM's `root` (the weights behind a `--served-model-name`) where it
  is given, else the listed id, else the `model` field of the replies.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai

from glyph_core.config import TeacherConfig
from glyph_core.errors import EndpointError, GlyphError
from glyph_core.teachers.base import Completion, GenRequest

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 10.0


def _client(cfg: TeacherConfig) -> Any:
    if not cfg.base_url:  # TeacherConfig refuses this too; a hand-built config may not have run it
        raise GlyphError("the openai backend needs base_url (for example http://localhost:8000/v1)")
    key = os.environ.get(cfg.api_key_env) or "EMPTY"  # local servers accept any key
    timeout = openai.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, CONNECT_TIMEOUT_S))
    return openai.OpenAI(base_url=cfg.base_url, api_key=key, timeout=timeout, max_retries=cfg.max_retries)


def served_model(client: Any, cfg: TeacherConfig) -> str | None:
    """What the endpoint serves under `cfg.model` (see the module doc), or None when it does not
    list its models. Raises `EndpointError` when it cannot be reached or refuses the key."""
    probe = client.with_options(
        timeout=min(cfg.timeout_s, PROBE_TIMEOUT_S), max_retries=min(cfg.max_retries, 1)
    )
    where = f"teacher endpoint {cfg.base_url}"
    try:
        listed = list(probe.models.list())
    except openai.APITimeoutError:
        raise EndpointError(
            f"{where} accepted the connection but did not answer GET /models within "
            f"{min(cfg.timeout_s, PROBE_TIMEOUT_S):g} s: check that the server has finished loading"
        ) from None
    except openai.APIConnectionError:
        raise EndpointError(
            f"{where} cannot be reached: check that the server is running and generate.teacher.base_url"
        ) from None
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise EndpointError(
            f"{where} refused the API key from ${cfg.api_key_env} (HTTP {exc.status_code}): check that key"
        ) from None
    except openai.APIError as exc:  # no listing on this server (404, 405, 501): identity unknown
        log.info("%s does not list its models (%s)", where, type(exc).__name__)
        return None
    match = next((m for m in listed if m.id == cfg.model), None)
    if match is None:
        log.warning("%s lists %s, not %r", where, [m.id for m in listed][:5], cfg.model)
        return None
    root = getattr(match, "root", None)  # vLLM: the weights behind a --served-model-name
    return str(root) if root else str(match.id)


class OpenAITeacher:
    def __init__(self, cfg: TeacherConfig, client: Any | None = None) -> None:
        self.cfg = cfg
        self.client = client if client is not None else _client(cfg)
        self.served = served_model(self.client, cfg)
        self.name = f"openai:{self.served or cfg.model}"
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
        if self.served is None and getattr(resp, "model", None):  # no listing: the reply says
            self.served = str(resp.model)
            self.name = f"openai:{self.served}"
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
