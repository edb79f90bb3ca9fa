"""Our lm-eval presets against lm-eval 0.4.13's own request objects, built
offline from the bundled test and train splits: the same prompt strings,
byte for byte, and the same stop sequences."""

import dataclasses

import pytest
import transformers
from lm_eval_tasks import lm_eval_requests, lm_eval_task_objects, write_local_tasks

from gsm8k_jax.eval.data import load_gsm8k
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE
from gsm8k_jax.eval.runner import EvalConfig
from gsm8k_jax.eval.tasks import TASKS, format_prompts, task_eval_config
from gsm8k_jax.models.specs import TINY_MODEL_DIR

NUM_PROBLEMS = 16
LM_EVAL_PRESETS = [name for name, task in TASKS.items() if task.lm_eval_task]


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    return lm_eval_task_objects(write_local_tasks(tmp_path_factory.mktemp("tasks")))


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def our_prompts(task, tokenizer, system_prompt=None):
    questions = [e.question for e in load_gsm8k(num_examples=NUM_PROBLEMS)]
    return format_prompts(
        task,
        questions,
        tokenizer,
        template=DEFAULT_PROMPT_TEMPLATE,
        system_prompt=system_prompt,
        use_chat_template=task.chat,
    )


def test_every_lm_eval_task_has_a_plain_and_a_chat_preset():
    assert sorted(LM_EVAL_PRESETS) == sorted(
        f"{t}{chat}"
        for t in ("gsm8k", "gsm8k_cot", "gsm8k_cot_zeroshot")
        for chat in ("", "_chat")
    )


@pytest.mark.parametrize("name", LM_EVAL_PRESETS)
def test_prompts_and_stops_are_lm_evals(name, lm_eval_tasks, tokenizer):
    task = TASKS[name]
    requests = lm_eval_requests(
        lm_eval_tasks[task.lm_eval_task], NUM_PROBLEMS, tokenizer, chat=task.chat
    )
    assert [r.doc_id for r in requests] == list(range(NUM_PROBLEMS))
    assert our_prompts(task, tokenizer) == [r.args[0] for r in requests]
    assert all(r.args[1]["until"] == list(task.until) for r in requests)
    # Few-shot draws differ per question (gsm8k) or are fixed (gsm8k_cot).
    assert len({r.args[0] for r in requests}) == NUM_PROBLEMS


@pytest.mark.parametrize("name", ["gsm8k", "gsm8k_chat"])
def test_a_system_prompt_is_lm_evals_system_instruction(name, lm_eval_tasks, tokenizer):
    task = TASKS[name]
    system = "You are a careful mathematician."
    requests = lm_eval_requests(
        lm_eval_tasks[task.lm_eval_task],
        4,
        tokenizer,
        chat=task.chat,
        system_instruction=system,
    )
    assert our_prompts(task, tokenizer, system)[:4] == [r.args[0] for r in requests]


def configure(task, *, instruction_tuned, given=(), **config):
    return task_eval_config(
        EvalConfig(**config),
        task,
        model_name="gemma3-1b-it" if instruction_tuned else "gemma3-1b-pt",
        instruction_tuned=instruction_tuned,
        given=set(given),
    )


def test_pretrained_models_default_to_lm_evals_gsm8k_and_instruction_tuned_to_boxed():
    pretrained = configure(None, instruction_tuned=False)
    assert pretrained.task == "gsm8k" and not pretrained.use_chat_template
    assert pretrained.sampling.max_generation_steps == 256
    tuned = configure(None, instruction_tuned=True)
    assert tuned == dataclasses.replace(EvalConfig(), task="boxed")
    assert tuned.sampling.max_generation_steps == 768 and tuned.use_chat_template


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_task_from_python_brings_its_length_and_prompt_form(name):
    """EvalConfig(task=...) left to its defaults is what the scripts' --task
    sets up: an lm-eval task generates at most lm-eval's max_gen_toks through
    its own prompt (before, 768 tokens, and flexible-extract read answers
    lm-eval never generates)."""
    task = TASKS[name]
    config = EvalConfig(task=name)
    assert config.sampling.max_generation_steps == task.max_gen_toks
    assert config.use_chat_template == (task.chat or task.lm_eval_task is None)
    assert config == configure(name, instruction_tuned=True)
    if task.lm_eval_task is not None:
        other_form = "gsm8k_chat" if name == "gsm8k" else None
        with pytest.raises(ValueError, match="is lm-eval's .* prompt: for the"):
            EvalConfig(task=name, use_chat_template=not task.chat)
        with pytest.raises(ValueError, match="prompt_template applies to task='boxed'"):
            EvalConfig(task=name, prompt_template="Q: {question}")
        if other_form:
            with pytest.raises(ValueError, match=f"use task='{other_form}'"):
                EvalConfig(task=name, use_chat_template=True)


def test_an_explicit_generation_length_wins_over_the_presets():
    config = EvalConfig()
    config = dataclasses.replace(
        config, sampling=dataclasses.replace(config.sampling, max_generation_steps=32)
    )
    configured = task_eval_config(
        config,
        "gsm8k_cot_chat",
        model_name="gemma3-1b-it",
        instruction_tuned=True,
        given={"max_generation_steps"},
    )
    assert configured.sampling.max_generation_steps == 32
    assert configured.use_chat_template and configured.task == "gsm8k_cot_chat"


@pytest.mark.parametrize(
    "task, instruction_tuned, given, message",
    [
        ("gsm8k_chat", False, (), "pretrained only .* use --task=gsm8k,"),
        ("boxed", False, (), "--task=boxed --nouse_chat_template"),
        ("gsm8k", True, ("prompt_template",), "--prompt_template applies to"),
        ("gsm8k", True, ("use_chat_template",), "its chat form is --task=gsm8k_chat"),
        ("gsm8k9", True, (), "Unknown task 'gsm8k9'; choose one of boxed, gsm8k,"),
    ],
)
def test_contradicting_settings_are_refused(task, instruction_tuned, given, message):
    with pytest.raises(ValueError, match=message):
        configure(task, instruction_tuned=instruction_tuned, given=given)
