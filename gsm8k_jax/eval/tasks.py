"""Task presets (`--task`): lm-evaluation-harness' GSM8K tasks, and our own.

A gap between a JAX evaluation and a published lm-eval figure can come from
prompts, stopping, extraction or numerics; only numerics are interesting.
So each lm-eval preset reproduces lm-eval 0.4.13's task of the same name:
its prompt byte for byte (few-shot examples drawn as lm-eval draws them),
its stop strings, its generation length (256 tokens, lm-eval's default) and
its strict-match and flexible-extract scores.

- `boxed`: our own prompt (prompts.py), asking for `\\boxed{}`; 768 tokens,
  no stop strings, no lm-eval scores. The default for instruction-tuned
  models, and what every run did before presets existed.
- `gsm8k` (5-shot "Question: ... Answer:", `#### N`; the default for
  pretrained models), `gsm8k_cot` (8-shot chain of thought, "The answer
  is N."), `gsm8k_cot_zeroshot`: plain text, as `lm_eval --tasks <name>`.
- `<name>_chat`: as `lm_eval --tasks <name> --apply_chat_template` (which
  turns on `--fewshot_as_multiturn`): every example a user/model turn pair
  through the tokenizer's chat template. Refused for pretrained models,
  which never saw chat turns.

lm-eval is optional, so the prompts are built here, not by lm-eval's task
objects; tests/eval/test_lm_eval_tasks.py proves them equal to lm-eval's
own requests.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import jinja2

from gsm8k_jax.eval.data import BUNDLED_TRAIN_SET, load_gsm8k
from gsm8k_jax.eval.extraction import HASH_FINAL_ANSWER
from gsm8k_jax.eval.lm_eval_filters import (
    FLEXIBLE_EXTRACT,
    STRICT_MATCH,
    RegexFilter,
    exact_match,
)
from gsm8k_jax.eval.prompts import format_prompt

if TYPE_CHECKING:
    from gsm8k_jax.checkpoints.lora_checkpoint import TrainedLora
    from gsm8k_jax.eval.runner import EvalConfig

__all__ = [
    "BOXED",
    "TASKS",
    "Task",
    "apply_chat_template",
    "default_task_name",
    "format_prompts",
    "get_task",
    "lm_eval_scores",
    "task_eval_config",
]

BOXED = "boxed"
# lm-eval's default --fewshot_random_seed: the few-shot sampler's seed.
FEWSHOT_SEED = 1234
# lm-eval's hf model generates at most this many tokens unless told otherwise.
LM_EVAL_MAX_GEN_TOKS = 256
_BOXED_MAX_GEN_TOKS = 768

_FLEXIBLE = RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
_GSM8K_FILTERS = (
    (STRICT_MATCH, RegexFilter(HASH_FINAL_ANSWER.pattern)),
    (FLEXIBLE_EXTRACT, _FLEXIBLE),
)
# The chain-of-thought tasks' final answer (their examples end with it).
# lm-eval's strict-match pattern ends in an unescaped `.`: any character, so
# an answer that ends the response ("The answer is 18") loses its last
# digit there. Its filter is kept as it is; our own extraction reads the
# number alone.
_COT_FINAL_ANSWER = re.compile(r"The answer is (\-?[0-9\.\,]+)")
_COT_FILTERS = (
    (STRICT_MATCH, RegexFilter(_COT_FINAL_ANSWER.pattern + ".")),
    (FLEXIBLE_EXTRACT, _FLEXIBLE),
)

# gsm8k-cot.yaml's `fewshot_config.samples` (question, target), in order.
_COT_EXAMPLES = (
    (
        (
            "There are 15 trees in the grove. Grove workers will plant trees in the"
            " grove today. After they are done, there will be 21 trees. How many"
            " trees did the grove workers plant today?"
        ),
        (
            "There are 15 trees originally. Then there were 21 trees after some more"
            " were planted. So there must have been 21 - 15 = 6. The answer is 6."
        ),
    ),
    (
        (
            "If there are 3 cars in the parking lot and 2 more cars arrive, how many"
            " cars are in the parking lot?"
        ),
        (
            "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer"
            " is 5."
        ),
    ),
    (
        (
            "Leah had 32 chocolates and her sister had 42. If they ate 35, how many"
            " pieces do they have left in total?"
        ),
        (
            "Originally, Leah had 32 chocolates. Her sister had 42. So in total they"
            " had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is"
            " 39."
        ),
    ),
    (
        (
            "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12"
            " lollipops. How many lollipops did Jason give to Denny?"
        ),
        (
            "Jason started with 20 lollipops. Then he had 12 after giving some to"
            " Denny. So he gave Denny 20 - 12 = 8. The answer is 8."
        ),
    ),
    (
        (
            "Shawn has five toys. For Christmas, he got two toys each from his mom"
            " and dad. How many toys does he have now?"
        ),
        (
            "Shawn started with 5 toys. If he got 2 toys each from his mom and dad,"
            " then that is 4 more toys. 5 + 4 = 9. The answer is 9."
        ),
    ),
    (
        (
            "There were nine computers in the server room. Five more computers were"
            " installed each day, from monday to thursday. How many computers are now"
            " in the server room?"
        ),
        (
            "There were originally 9 computers. For each of 4 days, 5 more computers"
            " were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The"
            " answer is 29."
        ),
    ),
    (
        (
            "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On"
            " wednesday, he lost 2 more. How many golf balls did he have at the end"
            " of wednesday?"
        ),
        (
            "Michael started with 58 golf balls. After losing 23 on tuesday, he had"
            " 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The"
            " answer is 33."
        ),
    ),
    (
        (
            "Olivia has $23. She bought five bagels for $3 each. How much money does"
            " she have left?"
        ),
        (
            "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15"
            " dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is"
            " 8."
        ),
    ),
)


@dataclasses.dataclass(frozen=True)
class Task:
    """A preset: how a question becomes a prompt, and how the answer is scored.

    Attributes:
      name: the `--task` value.
      lm_eval_task: lm-eval's task of the same prompts and scores; None for
        `boxed`, which is ours.
      chat: through the chat template, few-shot examples as turns (`boxed`
        follows `--[no]use_chat_template` instead).
      question_format: lm-eval's `doc_to_text`, `{question}` the question.
      num_fewshot: examples before the question.
      fixed_examples: lm-eval's `first_n` sampler's (question, target)
        pairs; empty: examples are drawn from GSM8K's train split with
        lm-eval's seed, a fresh draw per question, in order.
      until: lm-eval's stop strings (the eos token's text is added).
      max_gen_toks: most new tokens.
      filters: lm-eval's (name, filter) pairs.
      final_answer_reference: exact_match's reference is the text after
        `####` (gsm8k_cot), not the whole reference solution.
      final_answer: the final-answer format the prompt teaches, group 1 the
        answer: our strict extraction reads it when there is no `\\boxed{}`.
    """

    name: str
    lm_eval_task: str | None = None
    chat: bool = False
    question_format: str = "{question}"
    num_fewshot: int = 0
    fixed_examples: tuple[tuple[str, str], ...] = ()
    until: tuple[str, ...] = ()
    max_gen_toks: int = _BOXED_MAX_GEN_TOKS
    filters: tuple[tuple[str, RegexFilter], ...] = ()
    final_answer_reference: bool = False
    final_answer: re.Pattern[str] = HASH_FINAL_ANSWER

    def reference(self, solution: str) -> str:
        """exact_match's reference (lm-eval's `doc_to_target`) of a GSM8K
        reference solution."""
        if self.final_answer_reference:
            return solution.split("####")[-1].strip()
        return solution


_LM_EVAL_TASKS = (
    Task(
        "gsm8k",
        lm_eval_task="gsm8k",
        question_format="Question: {question}\nAnswer:",
        num_fewshot=5,
        until=("Question:", "</s>", "<|im_end|>"),
        max_gen_toks=LM_EVAL_MAX_GEN_TOKS,
        filters=_GSM8K_FILTERS,
    ),
    Task(
        "gsm8k_cot",
        lm_eval_task="gsm8k_cot",
        question_format="Q: {question}\nA:",
        num_fewshot=8,
        fixed_examples=_COT_EXAMPLES,
        until=("Q:", "</s>", "<|im_end|>"),
        max_gen_toks=LM_EVAL_MAX_GEN_TOKS,
        filters=_COT_FILTERS,
        final_answer_reference=True,
        final_answer=_COT_FINAL_ANSWER,
    ),
    Task(
        "gsm8k_cot_zeroshot",
        lm_eval_task="gsm8k_cot_zeroshot",
        question_format="Q: {question}\nA: Let's think step by step.",
        until=("Q:", "</s>", "<|im_end|>"),
        max_gen_toks=LM_EVAL_MAX_GEN_TOKS,
        filters=_COT_FILTERS,
        final_answer=_COT_FINAL_ANSWER,
    ),
)

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(BOXED),
        *_LM_EVAL_TASKS,
        *(
            dataclasses.replace(task, name=f"{task.name}_chat", chat=True)
            for task in _LM_EVAL_TASKS
        ),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return TASKS[name]


def default_task_name(instruction_tuned: bool) -> str:
    """`boxed` for instruction-tuned models; lm-eval's `gsm8k` (5-shot,
    plain text), the setting of published base-model figures, for
    pretrained ones."""
    return BOXED if instruction_tuned else "gsm8k"


def trained_lora_warnings(
    trained: TrainedLora, revision: str, model_dir: str, config: EvalConfig
) -> list[str]:
    """Why `trained` may answer worse in a run of `config` on the weights of
    `revision` (at `model_dir`) than it learned to: other base weights
    (`TrainedLora.base_model_warning`), other prompts
    (`training_prompt_warning`)."""
    warnings = (
        trained.base_model_warning(revision, model_dir),
        training_prompt_warning(
            trained.prompt_template, str(trained.settings_path), config
        ),
    )
    return [w for w in warnings if w]


def training_prompt_warning(
    trained_template: str | None, recorded_at: str, config: EvalConfig
) -> str:
    """Why an adapter may answer worse under `config`'s prompts than it
    would under those it was trained on (`trained_template` as the user turn,
    chat-templated, no system turn: our trainer's prompts, recorded at
    `recorded_at`), or "" where nothing says so: nothing recorded, the same
    prompts, or an lm-eval task (prompts of its own, a choice made apart)."""
    if trained_template is None or get_task(config.task).lm_eval_task is not None:
        return ""
    differing = []
    if config.prompt_template != trained_template:
        differing.append(
            f"--prompt_template={config.prompt_template!r} (trained with"
            f" {trained_template!r})"
        )
    if config.system_prompt:
        differing.append("--system_prompt (trained with none)")
    if not config.use_chat_template:
        differing.append("--nouse_chat_template (trained chat-templated)")
    if not differing:
        return ""
    return (
        f"the LoRA checkpoint was trained on other prompts ({recorded_at}):"
        f" {'; '.join(differing)}. An adapter answers best in the format it"
        " was trained on."
    )


def task_eval_config(
    config: EvalConfig,
    task_name: str | None,
    *,
    model_name: str,
    instruction_tuned: bool,
    given: Collection[str],
) -> EvalConfig:
    """`config` set up for `--task=task_name` (None: the model's default).

    An lm-eval preset brings its generation length unless
    `--max_generation_steps` is `given` (the names of the flags on the
    command line), and its own prompt, so `--prompt_template` and
    `--[no]use_chat_template` are refused with it. A chat template for a
    pretrained model is refused.
    """
    task = get_task(task_name or default_task_name(instruction_tuned))
    if task.lm_eval_task is None:
        if config.use_chat_template and not instruction_tuned:
            raise ValueError(
                f"{model_name} is pretrained only and never saw chat turns: use"
                " --task=gsm8k (lm-eval's few-shot prompt) or --task=boxed"
                " --nouse_chat_template."
            )
        return dataclasses.replace(config, task=task.name)
    own = sorted({"prompt_template", "use_chat_template"} & set(given))
    if own:
        raise ValueError(
            f"--{own[0]} applies to --task=boxed; --task={task.name} uses"
            f" lm-eval's prompt (its chat form is --task={task.lm_eval_task}_chat)."
        )
    if task.chat and not instruction_tuned:
        raise ValueError(
            f"{model_name} is pretrained only and never saw chat turns: use"
            f" --task={task.lm_eval_task}, lm-eval's plain-text prompt."
        )
    sampling = config.sampling
    if "max_generation_steps" not in given:
        sampling = dataclasses.replace(sampling, max_generation_steps=task.max_gen_toks)
    return dataclasses.replace(
        config, task=task.name, sampling=sampling, use_chat_template=task.chat
    )


def apply_chat_template(
    tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """The chat prompt text, rendered as lm-eval's hf model renders it (a
    template that rejects system turns gets them dropped)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("This tokenizer has no chat template.")
    kwargs = {
        "tokenize": False,
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": not add_generation_prompt,
    }
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.exceptions.TemplateError:
        messages = [m for m in messages if m["role"] != "system"]
        return tokenizer.apply_chat_template(messages, **kwargs)


@functools.cache
def _train_examples() -> tuple[tuple[str, str], ...]:
    """GSM8K's train split (bundled), in file order, as (question, answer)."""
    return tuple((e.question, e.answer) for e in load_gsm8k(BUNDLED_TRAIN_SET))


def _fewshot_examples(task: Task, count: int) -> list[tuple[tuple[str, str], ...]]:
    """The few-shot examples of each of `count` questions, in order: lm-eval's
    `first_n` sampler, or its default one, which draws from the train split
    with one generator seeded once, so question i gets the i-th draw."""
    if task.num_fewshot == 0:
        return [()] * count
    if task.fixed_examples:
        return [task.fixed_examples[: task.num_fewshot]] * count
    pool = _train_examples()
    rng = random.Random(FEWSHOT_SEED)
    return [
        tuple(pool[i] for i in rng.sample(range(len(pool)), task.num_fewshot))
        for _ in range(count)
    ]


def _lm_eval_prompt(
    task: Task,
    question: str,
    examples: Sequence[tuple[str, str]],
    tokenizer,
    system_prompt: str | None,
) -> str:
    """lm-eval's prompt: examples as question, " ", answer, "\\n\\n", then the
    question; or, in chat, one user/assistant turn pair per example (a
    system prompt is prepended as is, or is the system turn)."""

    def text(q: str) -> str:
        return task.question_format.replace("{question}", q)

    if not task.chat:
        shots = "".join(f"{text(q)} {answer}\n\n" for q, answer in examples)
        return (system_prompt or "") + shots + text(question)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for q, answer in examples:
        messages += [
            {"role": "user", "content": text(q)},
            {"role": "assistant", "content": answer},
        ]
    messages.append({"role": "user", "content": text(question)})
    return apply_chat_template(tokenizer, messages)


def format_prompts(
    task: Task,
    questions: Sequence[str],
    tokenizer,
    *,
    template: str,
    system_prompt: str | None,
    use_chat_template: bool,
) -> list[str]:
    """The prompt of each question, in order (with few-shot draws, the i-th
    question's examples depend on i, as in lm-eval). `template` and
    `use_chat_template` apply to `boxed` only."""
    if task.lm_eval_task is None:
        return [
            format_prompt(
                q,
                tokenizer,
                template=template,
                system_prompt=system_prompt,
                use_chat_template=use_chat_template,
            )
            for q in questions
        ]
    examples = _fewshot_examples(task, len(questions))
    return [
        _lm_eval_prompt(task, q, shots, tokenizer, system_prompt)
        for q, shots in zip(questions, examples, strict=True)
    ]


def lm_eval_scores(
    task: Task, response: str, solution: str
) -> dict[str, tuple[str | None, bool]]:
    """{filter name: (filtered answer, exact_match)} of a response to a
    problem with reference solution `solution`; empty for `boxed`."""
    reference = task.reference(solution)
    scores: dict[str, tuple[str | None, bool]] = {}
    for name, regex_filter in task.filters:
        answer = regex_filter(response)
        scores[name] = (answer, exact_match(answer, reference))
    return scores
