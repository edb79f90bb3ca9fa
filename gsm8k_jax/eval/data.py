"""Loading GSM8K problems from JSONL files.

The GSM8K test split (1,319 problems, MIT license) ships with the package, so
evaluation needs no download. Other files in the same format (one
`{"question": ..., "answer": ...}` object per line) load from local or
`gs://` paths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from gsm8k_jax import storage
from gsm8k_jax.eval.extraction import gold_answer

__all__ = ["BUNDLED_TEST_SET", "BUNDLED_TRAIN_SET", "GSM8KExample", "load_gsm8k"]

_FIELDS = ("question", "answer")
_FORMAT = 'JSONL file with one {"question": ..., "answer": ...} object per line'

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# GSM8K (MIT licence, data/LICENSE): 1,319 test and 7,473 train problems.
BUNDLED_TEST_SET = _DATA_DIR / "test.jsonl"
BUNDLED_TRAIN_SET = _DATA_DIR / "train.jsonl"


@dataclasses.dataclass(frozen=True)
class GSM8KExample:
    """One GSM8K problem.

    Attributes:
        id: 0-based line index in the source file; stable across runs, so results
            can be matched up and resumed.
        question: The problem statement.
        answer: The reference solution, ending in `#### N`.
    """

    id: int
    question: str
    answer: str

    @property
    def gold(self) -> str:
        """The gold final answer, e.g. `18`."""
        return gold_answer(self.answer)


def load_gsm8k(
    path: str | os.PathLike[str] | None = None,
    num_examples: int | None = None,
) -> list[GSM8KExample]:
    """Loads GSM8K problems from a JSONL file.

    Args:
        path: A local or `gs://` JSONL file; defaults to the bundled test set.
        num_examples: If set, only the first `num_examples` problems are loaded.

    Returns:
        The problems in file order. Blank lines are skipped.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If `num_examples` is not positive, the file holds no
            problems, or a line is not a JSON object with string `question`
            and `answer` fields whose answer ends in `#### <number>`.

    Asking for more problems than the file holds warns and loads them all.
    """
    if isinstance(path, int):
        raise TypeError(
            f"load_gsm8k's first argument is the file; for the first {path}"
            f" problems of the bundled test set, pass num_examples={path}."
        )
    if num_examples is not None and num_examples <= 0:
        raise ValueError(f"num_examples must be positive, got {num_examples}.")
    path = os.fspath(BUNDLED_TEST_SET if path is None else path)
    try:
        f = storage.open_text(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"GSM8K data file not found: {path}. Pass --data_path pointing at a"
            f" {_FORMAT}."
        ) from e
    except IsADirectoryError as e:
        raise ValueError(
            f"{path} is a folder: pass --data_path pointing at a {_FORMAT}."
        ) from e
    with f:
        try:
            examples = _parse(f, path, num_examples)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path} is not text ({e.reason} at byte {e.start}): pass"
                f" --data_path pointing at a {_FORMAT}."
            ) from e
    _check_count(path, examples, num_examples)
    return examples


def _parse(
    lines: Iterable[str], path: str, num_examples: int | None
) -> list[GSM8KExample]:
    """The problems of a JSONL file's lines, up to `num_examples`."""
    examples = []
    for index, line in enumerate(lines):
        if num_examples is not None and len(examples) == num_examples:
            break
        if not line.strip():
            continue
        where = f"{path}, line {index + 1}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{where}: invalid JSON: {e}; expected a {_FORMAT}."
            ) from e
        if not isinstance(record, dict):  # Bad data: a ValueError, as above.
            raise ValueError(  # noqa: TRY004
                f"{where}: not a JSON object; expected a {_FORMAT}."
            )
        invalid = [k for k in _FIELDS if not isinstance(record.get(k), str)]
        if invalid:
            raise ValueError(
                f"{where}: expected a JSON object with string {_FIELDS} fields;"
                f" missing or not a string: {invalid}."
            )
        gold = gold_answer(record["answer"])
        if not _is_number(gold):
            raise ValueError(
                f"{where}: the answer must end in '#### <number>' (GSM8K's"
                f" format); its final answer would be {gold[:40]!r}."
            )
        examples.append(
            GSM8KExample(id=index, question=record["question"], answer=record["answer"])
        )
    return examples


def _check_count(
    path: str, examples: list[GSM8KExample], num_examples: int | None
) -> None:
    """Refuses a file without problems; warns when it has fewer than asked."""
    if not examples:
        raise ValueError(
            f"{path} holds no GSM8K problems: expected one"
            ' {"question": ..., "answer": "... #### <number>"} object per line.'
        )
    if num_examples is not None and len(examples) < num_examples:
        warnings.warn(
            f"Asked for {num_examples} examples; {path} has {len(examples)}:"
            f" evaluating {len(examples)}.",
            stacklevel=3,
        )


def _is_number(text: str) -> bool:
    try:
        float(text.replace("$", ""))
    except ValueError:
        return False
    return True
