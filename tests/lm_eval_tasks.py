"""lm-eval 0.4.13's own GSM8K tasks on our bundled data, offline: the reference
for our presets.

Each local task `include:`s the installed original and changes only its name
and its data (GSM8K's test and train splits bundled with gsm8k_jax), so its
prompts, few-shot sampling, stop strings, filters and metric are lm-eval's.
"""

from __future__ import annotations

import functools
import os
import types
from pathlib import Path

from gsm8k_jax.eval.data import BUNDLED_TEST_SET, BUNDLED_TRAIN_SET

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LM_EVAL_TASKS = ("gsm8k", "gsm8k_cot", "gsm8k_cot_zeroshot")
FEWSHOT_SEED = 1234  # lm-eval's default --fewshot_random_seed


def local_name(task: str) -> str:
    return f"{task}_local"


def write_local_tasks(folder: Path) -> Path:
    """Writes one yaml per GSM8K task into `folder` (an `--include_path`)."""
    import lm_eval

    originals = Path(lm_eval.__file__).parent / "tasks" / "gsm8k"
    folder.mkdir(parents=True, exist_ok=True)
    for task in LM_EVAL_TASKS:
        original = originals / f"{task.replace('_', '-')}.yaml"
        (folder / f"{local_name(task)}.yaml").write_text(
            f"include: {original}\n"
            f"task: {local_name(task)}\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: {BUNDLED_TEST_SET}\n"
            f"    train: {BUNDLED_TRAIN_SET}\n"
        )
    return folder


@functools.cache
def lm_eval_task_objects(folder: Path) -> dict:
    """lm-eval's task objects of the local tasks in `folder`, by lm-eval name
    (built-in tasks are not indexed: that takes ~10 s)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    tasks = manager.load([local_name(t) for t in LM_EVAL_TASKS])["tasks"]
    return {task: tasks[local_name(task)] for task in LM_EVAL_TASKS}


def lm_eval_requests(
    task_object,
    limit: int,
    tokenizer,
    *,
    chat: bool,
    system_instruction: str | None = None,
) -> list:
    """lm-eval's request objects for the first `limit` test problems, built as
    `lm_eval --apply_chat_template` (fewshot_as_multiturn) builds them when
    `chat`, rendered by lm-eval's hf model's chat template method."""
    from lm_eval.models.huggingface import HFLM

    hf_model = types.SimpleNamespace(tokenizer=tokenizer, chat_template_args={})
    task_object.set_fewshot_seed(FEWSHOT_SEED)
    task_object.build_all_requests(
        limit=limit,
        system_instruction=system_instruction,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        chat_template=functools.partial(HFLM.apply_chat_template, hf_model)
        if chat
        else None,
    )
    return task_object.instances
