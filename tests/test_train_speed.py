"""The fast-SFT switches change how a step is computed, never what it computes.

On the tiny random llama (CPU, float32): padded batches of 4, padding-free micro-batches of 2 and
of 1 with accumulation, and gradient checkpointing train the same rows per optimizer step with the
same token-weighted loss over the same completion tokens, so the loss of every step, the tokens
seen and the trained adapter agree to float rounding. Liger's kernels are Triton (GPU only);
`benchmarks/sft_loss_check.py` compares the loss curves of the fast GPU configuration on a real
model. `resolve_speed` is a pure function of the host: its GPU branch is tested here with the
numbers of an H100 and the Qwen2.5-7B shape.
"""

from __future__ import annotations

import pytest
import torch

from glyph_core.config import LoraConfig, TrainConfig
from glyph_core.errors import GlyphError
from glyph_core.trainer import Host, activation_bytes_per_token, resolve_speed, train_sft
from tests.test_train import cfg_for, sft_rows

torch.set_num_threads(2)

H100_7B = dict(
    cuda=True,
    gpu_bytes=int(79.19 * 2**30),
    weight_bytes=int(7.616e9 * 2),
    params=int(7.616e9),
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    mean_row_tokens=410.0,
    liger_installed=True,
)


@pytest.fixture(scope="module")
def tiny() -> str:
    from glyph_core.models import tiny_model_dir

    return str(tiny_model_dir("llama"))


def _lora_weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.named_parameters() if "lora_" in k}


def test_padding_free_micro_batches_and_checkpointing_keep_every_step_loss(tmp_path, tiny):
    rows = sft_rows(16)  # rows of different lengths: padding differs between micro-batches
    runs = {
        "padded, 4 rows a pass": dict(padding_free=False, micro_batch_size=None),
        "padding-free, 2 rows a pass x 2": dict(padding_free=True, micro_batch_size=2),
        "padding-free, 1 row a pass x 4, checkpointing": dict(
            padding_free=True, micro_batch_size=1, gradient_checkpointing=True
        ),
    }
    results = {}
    for name, kw in runs.items():
        cfg = cfg_for(tiny, max_steps=4, save_steps=100, batch_size=4, grad_accum=1, **kw)
        results[name] = train_sft(rows, cfg, tmp_path / str(len(results)))
    speeds = {name: r.speed for name, r in results.items()}
    assert [s.micro_batch_size for s in speeds.values()] == [4, 2, 1]
    assert [s.grad_accum for s in speeds.values()] == [1, 2, 4]
    assert [s.padding_free for s in speeds.values()] == [False, True, True]

    ref_name, *others = results
    ref = results[ref_name].metrics.to_pylist()
    assert len(ref) == 4
    for name in others:
        got = results[name].metrics.to_pylist()
        assert [r["step"] for r in got] == [r["step"] for r in ref]
        # the same tokens enter every step: the count of input tokens agrees exactly
        assert [r["tokens_seen"] for r in got] == [r["tokens_seen"] for r in ref], name
        # the same completion tokens, weighted the same: the loss agrees to float rounding
        for a, b in zip(got, ref, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5), (name, a["step"])
    ref_w = _lora_weights(results[ref_name])
    assert ref_w
    for name in others:
        got_w = _lora_weights(results[name])
        for k, v in ref_w.items():
            assert torch.allclose(got_w[k], v, atol=1e-5), (name, k)
    manifest_speed = results[others[0]].run["speed"]  # the host's resolution, kept out of the manifest
    assert manifest_speed["padding_free"] is True and manifest_speed["micro_batch_size"] == 2


def test_speed_settings_stay_out_of_the_key_and_packing_stays_in():
    base = TrainConfig()
    fast = TrainConfig(
        micro_batch_size=2,
        padding_free=True,
        gradient_checkpointing=True,
        liger_kernel=True,
        attn_implementation="flex_attention",
        torch_compile=True,
    )
    assert base.key_dump() == fast.key_dump()
    assert TrainConfig(packing=True).key_dump() != base.key_dump()
    assert TrainConfig(batch_size=8, grad_accum=2).key_dump() != base.key_dump()


def test_micro_batch_must_divide_the_rows_of_a_step():
    with pytest.raises(Exception, match="micro_batch_size=3: must divide batch_size x grad_accum = 16"):
        TrainConfig(batch_size=4, grad_accum=4, micro_batch_size=3)
    assert TrainConfig(batch_size=4, grad_accum=4, micro_batch_size=8).micro_batch_size == 8


def test_cpu_resolves_to_todays_settings():
    speed = resolve_speed(TrainConfig(batch_size=4, grad_accum=4), Host(cuda=False))
    assert (speed.micro_batch_size, speed.grad_accum) == (4, 4)
    assert not speed.padding_free and not speed.gradient_checkpointing and not speed.liger_kernel
    assert speed.attn_implementation is None and not speed.torch_compile


def test_gpu_resolves_to_the_fast_settings_within_the_card():
    cfg = TrainConfig(batch_size=4, grad_accum=4, max_seq_len=2048)
    host = Host(**H100_7B)
    speed = resolve_speed(cfg, host)
    assert speed.padding_free and speed.liger_kernel and speed.attn_implementation == "sdpa"
    assert speed.micro_batch_size * speed.grad_accum == 16
    per_token = activation_bytes_per_token(
        host, liger=True, dropout=cfg.lora.dropout, checkpointing=speed.gradient_checkpointing
    )
    worst = speed.micro_batch_size * cfg.max_seq_len * per_token + host.weight_bytes
    assert worst < host.gpu_bytes  # the worst case (every row max_seq_len tokens) fits the card
    # flash-attn and liger follow what is installed
    assert resolve_speed(cfg, Host(**{**H100_7B, "flash_attn_installed": True})).attn_implementation == (
        "flash_attention_2"
    )
    assert not resolve_speed(cfg, Host(**{**H100_7B, "liger_installed": False})).liger_kernel


def test_gpu_micro_batch_grows_with_memory_and_checkpointing_only_where_it_pays():
    cfg = TrainConfig(batch_size=4, grad_accum=4, max_seq_len=1024, lora=LoraConfig(dropout=0.0))
    no_ckpt = cfg.model_copy(update={"gradient_checkpointing": False})
    small = resolve_speed(no_ckpt, Host(**{**H100_7B, "gpu_bytes": 40 * 2**30}))
    large = resolve_speed(no_ckpt, Host(**{**H100_7B, "gpu_bytes": 141 * 2**30}))
    assert small.micro_batch_size < large.micro_batch_size
    # long rows fill a pass without checkpointing; short rows make recomputation worth a pass 4x larger
    long_rows = resolve_speed(cfg, Host(**{**H100_7B, "mean_row_tokens": 1024.0}))
    short_rows = resolve_speed(cfg, Host(**{**H100_7B, "mean_row_tokens": 40.0}))
    assert not long_rows.gradient_checkpointing
    assert short_rows.gradient_checkpointing and short_rows.micro_batch_size == 16
    # a card too small for one row without checkpointing gets checkpointing
    tiny_card = resolve_speed(cfg, Host(**{**H100_7B, "gpu_bytes": 24 * 2**30}))
    assert tiny_card.gradient_checkpointing


def test_explicit_settings_are_kept_on_a_gpu():
    cfg = TrainConfig(
        batch_size=4,
        grad_accum=4,
        micro_batch_size=8,
        gradient_checkpointing=False,
        padding_free=False,
        liger_kernel=False,
        attn_implementation="flex_attention",
        torch_compile=True,
    )
    speed = resolve_speed(cfg, Host(**H100_7B))
    assert (speed.micro_batch_size, speed.grad_accum, speed.gradient_checkpointing) == (8, 2, False)
    assert not speed.padding_free and not speed.liger_kernel
    assert speed.attn_implementation == "flex_attention" and speed.torch_compile
    assert speed.why == "as configured"


def test_liger_on_a_cpu_fails_before_the_model_loads(tmp_path, monkeypatch):
    import glyph_core.trainer as trainer

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(trainer, "resolve_base_model", lambda name: name)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    cfg = TrainConfig(base_model="unused", device="cpu", liger_kernel=True, max_steps=1)
    with pytest.raises(GlyphError, match="liger_kernel=true needs a CUDA device"):
        train_sft(sft_rows(2), cfg, tmp_path)
