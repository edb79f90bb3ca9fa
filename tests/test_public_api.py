"""`import gsm8k_jax` is all a notebook needs."""

import importlib.util
import os
from pathlib import Path

import pytest
from fresh_interpreter import imported_after, only_value

import gsm8k_jax


def test_every_public_name_resolves():
    for name in gsm8k_jax.__all__:
        value = getattr(gsm8k_jax, name)
        assert getattr(value, "__name__", name) == name or not callable(value), name
    # Tab completion offers the public names alone, not the package's helpers.
    assert dir(gsm8k_jax) == gsm8k_jax.__all__


def test_reading_and_comparing_runs_imports_no_jax():
    """Comparing results on a laptop needs no jax or flax."""
    code = "import gsm8k_jax; gsm8k_jax.load_runs; gsm8k_jax.compare_runs; gsm8k_jax.LoraConfig"
    assert imported_after(code, ("jax", "flax")) == []


def test_loading_a_model_or_evaluating_does_not_import_torch(tmp_path):
    """transformers' config classes import torch where it is installed (as in
    the test extras): about 2 s of every start, for nothing."""
    assert importlib.util.find_spec("torch") is not None
    code = "import gsm8k_jax; gsm8k_jax.load_pretrained('gemma3-tiny')"
    assert imported_after(code, ("torch",)) == []
    script = Path(__file__).parent.parent / "research/script/eval_gsm8k_base.py"
    args = ["--num_examples=2", "--max_generation_steps=4", f"--output_dir={tmp_path}"]
    code = (
        f"import runpy; sys.argv = {[str(script), *args]!r}\n"
        f"try: runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit as e: assert not e.code, e.code"
    )
    assert imported_after(code, ("torch",)) == []
    assert (tmp_path / "summary_gemma3-tiny_base_bs32.json").is_file()


@pytest.mark.parametrize("torch_installed", [False, True])
def test_without_torch_the_package_silences_transformers_advice(torch_installed):
    """Without torch, transformers advises at import that PyTorch was not
    found (a notebook showed it): the package turns that advice off before
    anything imports transformers, as the scripts do; with torch installed,
    transformers' advice is left alone."""
    hide = "" if torch_installed else "import sys; sys.modules['torch'] = None\n"
    code = hide + (
        "import os, gsm8k_jax\n"
        "print(repr(os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS')))"
    )
    env = {
        k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    }
    assert only_value(code, env) == (None if torch_installed else "1")


def test_plausible_misuse_is_a_clear_error():
    with pytest.raises(TypeError, match="pass num_examples=5"):
        gsm8k_jax.load_gsm8k(5)
    with pytest.raises(TypeError, match=r"e\.g\. \(1,\)"):
        gsm8k_jax.SamplingParams(eos_ids=1)
    with pytest.raises(ValueError, match="row_tile must be >= 1"):
        gsm8k_jax.Sampler(None, None, row_tile=0)
    with pytest.raises(TypeError, match=r"output folder or a RunFiles\(output_dir"):
        gsm8k_jax.evaluate(None, [], gsm8k_jax.EvalConfig(), 5, run_info={})
    with pytest.raises(ValueError, match=r"the record gsm8k_jax.run_info\(...\)"):
        gsm8k_jax.evaluate(None, [], gsm8k_jax.EvalConfig(), "results", run_info={})
    # A number as the gold answer is read as its text.
    assert gsm8k_jax.is_correct("\\boxed{18}", 18)
    assert not gsm8k_jax.is_correct("\\boxed{18}", 12.5)


def test_a_tokenizer_without_chat_template_names_the_fix_in_python_too():
    _, tokenizer, _ = gsm8k_jax.load_pretrained("gemma3-tiny")
    # An empty system prompt is none, with the chat template or without.
    for chat in (False, True):
        plain = gsm8k_jax.format_prompt("2 + 3?", tokenizer, use_chat_template=chat)
        assert (
            gsm8k_jax.format_prompt(
                "2 + 3?", tokenizer, system_prompt="", use_chat_template=chat
            )
            == plain
        )
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"use_chat_template=False from Python"):
        gsm8k_jax.format_prompt("What is 2 + 3?", tokenizer)
    assert gsm8k_jax.format_prompt("2 + 3?", tokenizer, use_chat_template=False)
