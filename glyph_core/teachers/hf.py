"""The transformers backend: batched `generate` for hosts without vLLM (CPU, plain GPU hosts).

Why it is built this way:
* Left padding: a decoder continues from the last position, so with right padding the shorter
  prompts of a batch would continue after pad tokens.
* Requests are sorted by prompt length before batching, so a batch holds prompts of similar
  length and little compute goes to padding (the original scripts padded unsorted batches).
* `n` samples come from `num_return_sequences`, so the prompt is encoded once per request.
  Greedy decoding (temperature 0) gives one sequence, copied `n` times.
* The random seed is set per batch from the config seed and the batch's request ids, so a
  resumed run samples the same completions as an uninterrupted one.
* A batch that runs out of memory is split in half and retried; any other failure turns the
  batch into error completions instead of killing the stage.
* A directory holding a PEFT adapter (`adapter_config.json`) as `model` is loaded as base +
  adapter, merged: the fastest way to run the tuned model alone.
* `adapters` serve base and tuned from one model, as the vLLM backend does in one engine (the
  evaluate stage's path): the base is loaded once with the adapters attached; a request for an
  adapter merges it into the weights (so it computes exactly what the merged model computes),
  and a base request unmerges it (the base again, up to rounding: ask for the base first where
  bits matter, as the evaluate stage does) and runs under `disable_adapter()`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from glyph_core.config import TeacherConfig
from glyph_core.errors import GlyphError
from glyph_core.models import resolve_model
from glyph_core.teachers.base import Completion, GenRequest

log = logging.getLogger(__name__)


def pick_device(requested: str | None) -> str:
    import torch

    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(dtype: str, device: str) -> Any:
    """bf16 on GPUs (A100/H100 run it natively), float32 on CPU (bf16 matmuls are slow there)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_model_and_tokenizer(cfg: TeacherConfig, device: str) -> tuple[Any, Any]:
    """Model and tokenizer from a local directory, an alias or a Hub id; adapters included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(cfg.model)
    dtype = pick_dtype(cfg.dtype, device)
    common: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        common["revision"] = cfg.revision
    adapter_cfg = Path(path) / "adapter_config.json"
    model: Any
    if cfg.adapters:
        if adapter_cfg.is_file():
            raise GlyphError(f"{path}: an adapter as the base model of a teacher with adapters")
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common)
        model = PeftModel.from_pretrained(base, cfg.adapters[0], adapter_name=adapter_name(0))
        for i, extra in enumerate(cfg.adapters[1:], 1):
            model.load_adapter(extra, adapter_name=adapter_name(i))
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    elif adapter_cfg.is_file():
        from peft import PeftModel

        base_name = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base_name:
            raise GlyphError(f"{adapter_cfg}: no base_model_name_or_path")
        base_path = resolve_model(base_name)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, **common)
        # Merged for inference: an unmerged LoRA adds its own matmuls to every layer, which made
        # CPU generation ~2.5x slower than the base model in the demo.
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
        has_tok = (Path(path) / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(path if has_tok else base_path, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common)
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    model.to(device)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def adapter_name(i: int) -> str:
    return f"adapter-{i + 1}"


def eos_ids(sources: list[Any], tokenizer: Any) -> set[int]:
    """Every `eos_token_id` of the given configs (generation config, model config) and the
    tokenizer's: generation stops at any of them. The vLLM backend uses the same set."""
    ids: set[int] = set()
    for src in sources:
        eos = getattr(src, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    return eos_ids([getattr(model, "generation_config", None), model.config], tokenizer)


def batch_seed(seed: int, ids: list[str]) -> int:
    h = hashlib.sha256(f"{seed}\x00{'|'.join(ids)}".encode()).digest()
    return int.from_bytes(h[:4], "little")


class TransformersTeacher:
    """A causal LM driven by `model.generate`, on CPU or GPU."""

    def __init__(self, cfg: TeacherConfig, model: Any | None = None, tokenizer: Any | None = None) -> None:
        self.cfg = cfg
        self.name = f"transformers:{cfg.model}"
        self.device = pick_device(cfg.device)
        if model is None or tokenizer is None:
            model, tokenizer = load_model_and_tokenizer(cfg, self.device)
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = _eos_ids(model, tokenizer)
        self._merged: str | None = None  # the adapter merged into the weights now

    # -- prompts ------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self, requests: list[GenRequest], n: int = 1, adapter: str | None = None
    ) -> list[list[Completion]]:
        if adapter is None and self.cfg.adapters:
            if self._merged is not None:  # W + BA - BA: the base again, up to rounding
                self.model.unmerge_adapter()
                self._merged = None
            with self.model.disable_adapter():
                return self._generate(requests, n)
        if adapter is not None:
            if adapter not in self.cfg.adapters:
                raise GlyphError(
                    f"adapter {adapter} is not one this teacher was built with ({self.cfg.adapters})"
                )
            self._use_adapter(adapter_name(self.cfg.adapters.index(adapter)))
        return self._generate(requests, n)

    def _use_adapter(self, name: str) -> None:
        """Make `name` the active adapter, merged into the weights (what a merged model computes)."""
        if self._merged == name:
            return
        if self._merged is not None:
            self.model.unmerge_adapter()
        self.model.set_adapter(name)
        self.model.merge_adapter()
        self._merged = name

    def _generate(self, requests: list[GenRequest], n: int) -> list[list[Completion]]:
        texts = [self.render(r.messages) for r in requests]
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(requests)), key=lambda i: (-lengths[i], i))  # longest first: OOM early
        out: list[list[Completion] | None] = [None] * len(requests)
        bs = max(1, self.cfg.batch_size)
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            for i, comps in zip(
                idx,
                self._generate_safe([texts[i] for i in idx], [requests[i].id for i in idx], n),
                strict=True,
            ):
                out[i] = comps
        return [c if c is not None else [] for c in out]

    def _generate_safe(self, texts: list[str], ids: list[str], n: int) -> list[list[Completion]]:
        import torch

        try:
            return self._generate_batch(texts, ids, n)
        except torch.OutOfMemoryError:
            if len(texts) == 1:
                return [
                    [Completion("", "error", 0, 0, error="OutOfMemoryError: one prompt does not fit")] * n
                ]
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            half = len(texts) // 2
            log.warning("out of memory at batch %d; splitting", len(texts))
            return self._generate_safe(texts[:half], ids[:half], n) + self._generate_safe(
                texts[half:], ids[half:], n
            )
        except Exception as exc:  # a shard must survive one bad batch; the stage counts errors
            log.exception("generation failed for a batch of %d", len(texts))
            err = f"{type(exc).__name__}: {exc}"[:500]
            return [[Completion("", "error", 0, 0, error=err) for _ in range(n)] for _ in texts]

    def _generate_batch(self, texts: list[str], ids: list[str], n: int) -> list[list[Completion]]:
        import torch

        cfg = self.cfg
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        greedy = cfg.temperature <= 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": cfg.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": sorted(self.eos_ids),
        }
        if greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=None,
                num_return_sequences=n,
            )
        torch.manual_seed(batch_seed(cfg.seed, ids))
        with torch.inference_mode():
            seqs = self.model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        new = seqs[:, prompt_len:].tolist()
        per = 1 if greedy else n
        results: list[list[Completion]] = []
        for b in range(len(texts)):
            comps = [self._completion(new[b * per + k], int(prompt_tokens[b])) for k in range(per)]
            results.append(comps * n if greedy else comps)
        return results

    def _completion(self, tokens: list[int], prompt_tokens: int) -> Completion:
        """Cut at the first eos: after it `generate` fills with pad, which may equal eos."""
        cut = next((j for j, t in enumerate(tokens) if t in self.eos_ids), None)
        if cut is None:
            body = tokens
            reason = "length" if len(tokens) >= self.cfg.max_new_tokens else "stop"
        else:
            body = tokens[:cut]
            reason = "stop"
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        return Completion(text, reason, prompt_tokens, len(body) + (0 if cut is None else 1))

    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
