"""Training data: GSM8K problems as chat exchanges, tokenized and batched.

The user turn is the question in the evaluation's prompt (`format_prompt`,
so training and evaluation see the same text); the model turn is the
reference solution rewritten to end the way strict extraction scores it
(`... The final answer is \\boxed{72}.`), closed by `<end_of_turn>`, the stop
token. The batch of each step is a function of (seed, step).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np
import transformers
from absl import logging

from gsm8k_jax.eval.data import GSM8KExample
from gsm8k_jax.eval.prompts import DEFAULT_PROMPT_TEMPLATE, format_prompt

END_OF_TURN = "<end_of_turn>"

# {'tokens', 'targets': int32, 'loss_mask': float32, 'valid': bool}, each
# [N, max_length]; targets[:, t] is the token after tokens[:, t].
Batch = dict[str, np.ndarray]


_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FINAL_LINE = re.compile(r"\n?####\s*(.+?)\s*$")


def format_answer(solution: str) -> str:
    """A GSM8K reference solution as the model turn's text.

    Calculator annotations (`<<48/2=24>>`) are removed and the final `#### N`
    line becomes `The final answer is \\boxed{N}.`:

        'She sold 48/2 = <<48/2=24>>24 clips.\\n#### 24'
        -> 'She sold 48/2 = 24 clips.\\nThe final answer is \\boxed{24}.'

    Raises:
      ValueError: the solution has no final `#### N` line.
    """
    text = _CALCULATOR.sub("", solution).rstrip()
    match = _FINAL_LINE.search(text)
    if match is None:
        raise ValueError(f"No final '#### N' line in the solution {solution!r}.")
    reasoning = text[: match.start()].rstrip()
    final = f"The final answer is \\boxed{{{match[1]}}}."
    return f"{reasoning}\n{final}" if reasoning else final


def make_examples(
    tokenizer: transformers.PreTrainedTokenizerBase,
    examples: Sequence[GSM8KExample],
    max_length: int,
    template: str = DEFAULT_PROMPT_TEMPLATE,
) -> Batch:
    """Tokenizes (prompt, answer) pairs into right-padded training arrays.

    The prompt is `format_prompt(question, template=template)` (chat
    template, `<bos>` included); the answer is `format_answer(solution)`
    followed by `<end_of_turn>`. Each is tokenized on its own, as the
    sampler tokenizes prompts, so training sees the token boundary that
    evaluation does.

    A sequence of n tokens gives n - 1 model inputs. Examples with more than
    max_length + 1 tokens are dropped, not truncated (a cut answer would
    teach the model to stop before its `\\boxed{}`); a log line counts them.

    Returns:
      A `Batch` of the kept examples, in order: loss_mask is 1 where the
      target is an answer token (`<end_of_turn>` included).
    """
    prompts = [
        format_prompt(e.question, tokenizer, template=template) for e in examples
    ]
    answers = [format_answer(e.answer) + END_OF_TURN for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answers, add_special_tokens=False).input_ids
    kept = [
        (p, a)
        for p, a in zip(prompt_ids, answer_ids)
        if len(p) + len(a) <= max_length + 1
    ]
    if len(kept) < len(examples):
        logging.info(
            "Dropped %d of %d examples longer than max_length=%d + 1 tokens.",
            len(examples) - len(kept),
            len(examples),
            max_length,
        )
    n = len(kept)
    batch = {
        "tokens": np.full((n, max_length), tokenizer.pad_token_id, np.int32),
        "targets": np.full((n, max_length), tokenizer.pad_token_id, np.int32),
        "loss_mask": np.zeros((n, max_length), np.float32),
        "valid": np.zeros((n, max_length), bool),
    }
    for row, (prompt, answer) in enumerate(kept):
        sequence = np.asarray(prompt + answer, np.int32)
        length = len(sequence) - 1
        batch["tokens"][row, :length] = sequence[:-1]
        batch["targets"][row, :length] = sequence[1:]
        batch["valid"][row, :length] = True
        # Target t is token t + 1: the answer's tokens are targets
        # len(prompt) - 1 onwards.
        batch["loss_mask"][row, len(prompt) - 1 : length] = 1.0
    return batch


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(
    num_examples: int, batch_size: int, step: int, seed: int
) -> np.ndarray:
    """The examples of step `step` (0-based): a fresh shuffle every epoch.

    A pure function of its arguments, so a resumed run sees the batches the
    uninterrupted run would have.
    """
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    return np.array(
        [_epoch_order(num_examples, seed, int(e))[o] for e, o in zip(epochs, offsets)]
    )
