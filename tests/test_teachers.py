"""Teacher backends: reference traces on real data, the transformers backend on tiny models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from glyph_core.config import TeacherConfig
from glyph_core.errors import GlyphError
from glyph_core.glyphs import Glyph, parse_trace, validate_trace
from glyph_core.prompts import messages_for
from glyph_core.teachers import GenRequest, make_teacher
from glyph_core.teachers.reference import ReferenceTeacher, reference_trace, split_sentences
from tests import fixtures_models as fm
from tests.fixtures_models import DATA_DIR, real_problem_rows

# fixtures (assigned, not imported, so that test parameters may shadow them)
smollm2, tiny_model, tiny_qwen2 = fm.smollm2, fm.tiny_model, fm.tiny_qwen2

# -- reference ---------------------------------------------------------------------------------


def test_reference_traces_are_valid_on_real_rows() -> None:
    rows = real_problem_rows(per_source=150)
    assert {r["source"] for r in rows} == {"gsm8k", "svamp", "math"}
    teacher = ReferenceTeacher()
    reqs = [GenRequest(r["id"], messages_for("glyph", r["question"]), r) for r in rows]
    out = teacher.generate(reqs, n=2)
    assert len(out) == len(rows)
    for row, comps in zip(rows, out, strict=True):
        assert len(comps) == 2 and comps[0] == comps[1]
        c = comps[0]
        assert c.finish_reason == "stop", (row["id"], c.error)
        assert validate_trace(c.text) == [], (row["id"], c.text)
        trace = parse_trace(c.text)
        assert trace.final_answer == str(row["answer"]).strip()
        assert "<<" not in c.text  # GSM8K calculator marks removed
        assert c.completion_tokens > 0 and c.prompt_tokens > 0
    assert teacher.name == "reference"


def test_reference_gsm8k_steps_are_solution_lines() -> None:
    row = {
        "id": "gsm8k/train/0",
        "source": "gsm8k",
        "solution": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
        "answer": "72",
    }
    trace = parse_trace(reference_trace(row))
    assert trace.texts(Glyph.STEP) == [
        "Natalia sold 48/2 = 24 clips in May.",
        "Natalia sold 48+24 = 72 clips.",
    ]
    assert trace.final_answer == "72"


def test_reference_svamp_equation_step() -> None:
    row = {"id": "svamp/chal-1", "source": "svamp", "solution": "( 76.0 - 25.0 )", "answer": "51"}
    trace = parse_trace(reference_trace(row))
    assert trace.texts(Glyph.STEP) == ["Compute 76 - 25 = 51."]


def test_sentences_never_split_inside_math() -> None:
    text = "Let $x = 3.5$. Then \\[y = x. z\\] holds! So $a.b$ is done. Price is \\$5. End"
    assert split_sentences(text) == [
        "Let $x = 3.5$.",
        "Then \\[y = x. z\\] holds!",
        "So $a.b$ is done.",
        "Price is \\$5.",
        "End",
    ]


def test_reference_without_gold_is_an_error_completion() -> None:
    req = GenRequest(
        "math/train/x/1", [], {"id": "math/train/x/1", "source": "math", "solution": "x", "answer": None}
    )
    [[c]] = ReferenceTeacher().generate([req], n=1)
    assert c.finish_reason == "error" and "no gold answer" in (c.error or "")


# -- transformers ------------------------------------------------------------------------------

QUESTIONS = [
    "What is 2 + 3?",
    "A farmer has 12 cows and buys 30 more cows at the market on Tuesday. How many cows does he have?",
    "Compute 7 * 8.",
    "Tom reads 10 pages a day for a week, then 5 pages a day for three days. How many pages did he read in total?",
]


def _reqs(kind: str = "latent") -> list[GenRequest]:
    return [GenRequest(f"q{i}", messages_for(kind, q)) for i, q in enumerate(QUESTIONS)]


def _hf(model: Path, **kw) -> object:
    cfg = TeacherConfig(backend="transformers", model=str(model), **{"max_new_tokens": 6, **kw})
    return make_teacher(cfg)


def test_transformers_shapes_lengths_and_left_padding(tiny_model: Path) -> None:
    teacher = _hf(tiny_model, temperature=0.0, batch_size=4)
    assert teacher.tokenizer.padding_side == "left"
    batched = teacher.generate(_reqs(), n=2)
    assert [len(c) for c in batched] == [2, 2, 2, 2]
    for comps in batched:
        assert comps[0] == comps[1]  # greedy: the n samples are the same sequence
        # a random model almost never emits eos within 6 tokens
        assert comps[0].finish_reason == "length" and comps[0].completion_tokens == 6
    # Left padding is right when a prompt gives the same greedy output alone and in a padded
    # batch (with right padding the short prompts would continue after pad tokens).
    prompt_tokens = {c[0].prompt_tokens for c in batched}
    assert len(prompt_tokens) == len(QUESTIONS)  # lengths differ, so the batch was padded
    single = _hf(tiny_model, temperature=0.0, batch_size=1)
    alone = single.generate(_reqs(), n=1)
    for a, b in zip(alone, batched, strict=True):
        assert a[0].text == b[0].text
        assert a[0].prompt_tokens == b[0].prompt_tokens


def test_transformers_sampling_n_and_seed(tiny_qwen2: Path) -> None:
    teacher = _hf(tiny_qwen2, temperature=1.0, top_p=1.0, batch_size=2, seed=7)
    first = teacher.generate(_reqs()[:2], n=3)
    again = teacher.generate(_reqs()[:2], n=3)
    assert [len(c) for c in first] == [3, 3]
    assert first == again  # seeded per batch: reruns and resumes sample the same
    assert len({c.text for c in first[0]}) > 1  # the n samples differ


def test_transformers_cuts_at_eos_and_reports_stop(tiny_model: Path) -> None:
    teacher = _hf(tiny_model, temperature=0.0)
    eos = teacher.tokenizer.eos_token_id
    hello = teacher.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    c = teacher._completion([*hello, eos, eos, eos], prompt_tokens=5)
    assert (c.text, c.finish_reason, c.completion_tokens) == ("hello world", "stop", len(hello) + 1)
    c = teacher._completion(hello[:1] * 6, prompt_tokens=5)
    assert c.finish_reason == "length" and c.completion_tokens == 6


def test_transformers_loads_peft_adapter_dir(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():  # make the adapter change the output visibly
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model
    )

    tuned = _hf(adapter, temperature=0.0, max_new_tokens=8)
    assert not isinstance(tuned.model, PeftModel)  # merged into the base for inference speed
    plain = _hf(tiny_model, temperature=0.0, max_new_tokens=8)
    a = tuned.generate(_reqs()[:2], n=1)
    b = plain.generate(_reqs()[:2], n=1)
    assert [c[0].text for c in a] != [c[0].text for c in b]


@pytest.fixture(scope="module")
def lora_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT LoRA adapter on the tiny model, saved as the train stage saves one. Its B
    matrices are drawn large so that it visibly changes greedy decoding: a few optimizer steps
    do not move a random 64-wide model's greedy output (tried: the loss stays at ln(vocab))."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    lora = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    adapter = tmp_path_factory.mktemp("adapter") / "adapter"
    lora.save_pretrained(adapter)
    return adapter


def test_one_model_serves_base_and_adapter_like_two_models(tiny_model: Path, lora_adapter: Path) -> None:
    """The evaluation's one-model path (base loaded once, the adapter attached and selected per
    call) gives the same greedy completions as today's two models (the base alone, and the
    adapter merged into a second copy of the base)."""
    from peft import PeftModel

    adapter = str(lora_adapter)
    both = _hf(tiny_model, temperature=0.0, max_new_tokens=8, adapters=[adapter])
    assert isinstance(both.model, PeftModel)
    base_one = both.generate(_reqs(), n=1)
    tuned_one = both.generate(_reqs(), n=1, adapter=adapter)

    base_two = _hf(tiny_model, temperature=0.0, max_new_tokens=8).generate(_reqs(), n=1)
    tuned_two = _hf(lora_adapter, temperature=0.0, max_new_tokens=8).generate(_reqs(), n=1)
    assert [c[0] for c in base_one] == [c[0] for c in base_two]
    assert [c[0] for c in tuned_one] == [c[0] for c in tuned_two]
    assert [c[0].text for c in tuned_one] != [c[0].text for c in base_one]  # the adapter matters

    with pytest.raises(GlyphError, match="not one this teacher was built with"):
        both.generate(_reqs()[:1], n=1, adapter=str(tiny_model))


def test_eval_models_one_teacher_for_an_adapter_two_in_turn_for_a_full_model(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, lora_adapter: Path, tmp_path: Path
) -> None:
    """`EvalModels` builds one teacher for base + adapter; for a full (merged) tuned model it
    closes the base's teacher before building the tuned one. Teachers are fakes (recording
    builds and closes), the directories real."""
    import glyph_core.evaluate as evaluate_module
    from glyph_core.config import EvalConfig
    from glyph_core.evaluate import EvalModels

    events: list[str] = []

    class FakeTeacher:
        def __init__(self, cfg: TeacherConfig) -> None:
            self.cfg = cfg
            events.append(f"build {Path(cfg.model).name} adapters={[Path(a).name for a in cfg.adapters]}")

        def close(self) -> None:
            events.append(f"close {Path(self.cfg.model).name}")

    monkeypatch.setattr(evaluate_module, "make_teacher", FakeTeacher)
    base, adapter = str(tiny_model), str(lora_adapter)
    with EvalModels(EvalConfig(), base, adapter) as models:
        t1, a1 = models.teacher_for(base)
        t2, a2 = models.teacher_for(adapter)
    assert t1 is t2 and (a1, a2) == (None, adapter)
    assert events == [f"build {Path(base).name} adapters=['adapter']", f"close {Path(base).name}"]

    events.clear()
    full = tmp_path / "merged"
    full.mkdir()  # no adapter_config.json: a model of its own
    with EvalModels(EvalConfig(), base, str(full)) as models:
        models.teacher_for(base)
        _, adapter_arg = models.teacher_for(str(full))
    assert adapter_arg is None
    assert events == [
        f"build {Path(base).name} adapters=[]",
        f"close {Path(base).name}",  # released before the next model loads
        "build merged adapters=[]",
        "close merged",
    ]


def test_vllm_backend_missing_is_a_clear_error() -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(GlyphError, match="vllm"):
        make_teacher(TeacherConfig(backend="vllm", model="x"))


@pytest.mark.slow
def test_smollm2_glyph_prompt_generates_text(smollm2: Path) -> None:
    teacher = _hf(smollm2, temperature=0.0, max_new_tokens=96, batch_size=4)
    out = teacher.generate(_reqs("glyph")[:2], n=1)
    for [c] in out:
        assert c.text.strip()
        assert c.finish_reason in ("stop", "length")
        assert "<|im_end|>" not in c.text
    assert any(c.finish_reason == "stop" for [c] in out) or all(c.completion_tokens == 96 for [c] in out)


def test_data_dir_present() -> None:
    assert DATA_DIR.is_dir()
