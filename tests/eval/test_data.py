"""Loading GSM8K JSONL files: the bundled test set, local and gs:// files, errors."""

import dataclasses
import json
import re

import pytest
from gcs_emulator import gcs_filesystem, running_gcs_emulator

from gsm8k_jax.eval.data import BUNDLED_TEST_SET, GSM8KExample, load_gsm8k

ROWS = [
    {"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"},
    {"question": "What is 600 + 400?", "answer": "#### 1,000"},
    {"question": "What is 2 - 7?", "answer": "#### -5"},
]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", [json.dumps(r) for r in ROWS])


def test_bundled_test_set():
    assert BUNDLED_TEST_SET.is_file()
    assert (BUNDLED_TEST_SET.parent / "LICENSE").is_file()
    examples = load_gsm8k()
    assert len(examples) == 1319
    assert [ex.id for ex in examples] == list(range(1319))
    first = examples[0]
    assert first.question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.gold == "18"
    assert all(re.fullmatch(r"-?\d+", ex.gold) for ex in examples)


def test_num_examples():
    assert load_gsm8k(num_examples=5) == load_gsm8k()[:5]
    assert len(load_gsm8k(num_examples=10_000)) == 1319


@pytest.mark.parametrize("num_examples", [0, -1])
def test_num_examples_must_be_positive(num_examples):
    with pytest.raises(ValueError, match="num_examples"):
        load_gsm8k(num_examples=num_examples)


def test_load_local_file(jsonl):
    for path in (jsonl, str(jsonl)):
        examples = load_gsm8k(path)
        assert examples == [
            GSM8KExample(id=i, question=r["question"], answer=r["answer"])
            for i, r in enumerate(ROWS)
        ]
    assert [ex.gold for ex in examples] == ["2", "1000", "-5"]


def test_example_is_frozen():
    ex = GSM8KExample(id=0, question="q", answer="#### 3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.answer = "#### 4"


def test_blank_lines_are_skipped_and_ids_follow_lines(tmp_path):
    rows = [json.dumps(r) for r in ROWS]
    path = write_jsonl(tmp_path / "d.jsonl", ["", rows[0], "   ", rows[1], rows[2], ""])
    examples = load_gsm8k(path)
    assert [ex.id for ex in examples] == [1, 3, 4]
    assert [ex.gold for ex in examples] == ["2", "1000", "-5"]
    assert [ex.id for ex in load_gsm8k(path, num_examples=2)] == [1, 3]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        load_gsm8k(path)
    assert str(path) in str(e.value)
    assert "--data_path" in str(e.value)


def test_invalid_json_names_file_and_line(tmp_path):
    rows = [json.dumps(r) for r in ROWS]
    path = write_jsonl(tmp_path / "bad.jsonl", [rows[0], "", '{"question": "q", '])
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}, line 3: invalid JSON"
    ):
        load_gsm8k(path)


def test_error_past_num_examples_is_not_reached(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(ROWS[0]), "not json"])
    assert len(load_gsm8k(path, num_examples=1)) == 1


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"question": "q"}', "answer"),
        ('{"answer": "#### 1"}', "question"),
        ('{"question": 3, "answer": "#### 1"}', "question"),
    ],
)
def test_missing_field_names_file_line_and_field(tmp_path, line, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(ROWS[0]), line])
    with pytest.raises(ValueError) as e:
        load_gsm8k(path)
    message = str(e.value)
    assert f"{path}, line 2:" in message
    assert repr(field) in message.partition("missing or not a string")[2]


@pytest.mark.parametrize(
    "text",
    [
        '[{"question": "q", "answer": "#### 1"}]\n',  # one JSON array
        '["q", "#### 1"]\n',
        "question,answer\nq,#### 1\n",  # CSV
    ],
)
def test_a_file_that_is_not_jsonl_says_what_is_expected(tmp_path, text):
    path = tmp_path / "data.txt"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_gsm8k(path)
    message = str(e.value)
    assert message.startswith(f"{path}, line 1: ")
    assert message.endswith(
        'expected a JSONL file with one {"question": ..., "answer": ...} object'
        " per line."
    )


def test_load_from_gcs(jsonl):
    with running_gcs_emulator("gsm8k-test"):
        gcs_filesystem().put(str(jsonl), "gsm8k-test/data/test.jsonl")
        examples = load_gsm8k("gs://gsm8k-test/data/test.jsonl", num_examples=2)
        assert examples == load_gsm8k(jsonl)[:2]
        with pytest.raises(FileNotFoundError, match="--data_path"):
            load_gsm8k("gs://gsm8k-test/missing.jsonl")


def test_a_folder_or_a_binary_file_as_data_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"is a folder: pass --data_path"):
        load_gsm8k(tmp_path)
    (tmp_path / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ValueError, match=r"plot.png is not text .*: pass --data_path"):
        load_gsm8k(tmp_path / "plot.png")
