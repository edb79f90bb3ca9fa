"""Tests for the offline `gemma3-tiny` tokenizer in gsm8k_jax/assets/gemma3_tiny."""

import json
import pathlib
import subprocess
import sys

import pytest
import transformers

from gsm8k_jax.eval.data import BUNDLED_TRAIN_SET

REPO = pathlib.Path(__file__).resolve().parents[2]
ASSETS = REPO / "gsm8k_jax" / "assets" / "gemma3_tiny"
BUILD_SCRIPT = REPO / "research" / "script" / "build_tiny_tokenizer.py"
TEST_JSONL = REPO / "gsm8k_jax" / "data" / "test.jsonl"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(str(ASSETS))


@pytest.fixture(scope="module")
def test_records():
    with open(TEST_JSONL, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(50), f)]


def test_tokenizer_files_small():
    names = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
    assert sum((ASSETS / name).stat().st_size for name in names) < 1_000_000


def test_special_token_ids(tok):
    assert len(tok) == 4096
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<eos>", 1)
    assert (tok.bos_token, tok.bos_token_id) == ("<bos>", 2)
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 3)
    assert (tok.mask_token, tok.mask_token_id) == ("<mask>", 4)
    assert tok.convert_tokens_to_ids("<unused0>") == 5
    assert tok.convert_tokens_to_ids("<start_of_turn>") == 105
    assert tok.convert_tokens_to_ids("<end_of_turn>") == 106
    # Learnt vocabulary starts right after the special tokens.
    assert all(i >= 107 for i in tok.encode("hello world 42", add_special_tokens=False))


def test_turn_markers_are_single_tokens(tok):
    assert tok.encode("<end_of_turn>", add_special_tokens=False) == [106]
    assert tok.encode("<start_of_turn>", add_special_tokens=False) == [105]


def test_generation_config():
    cfg = json.loads((ASSETS / "generation_config.json").read_text())
    assert cfg == {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
    gen = transformers.GenerationConfig.from_pretrained(str(ASSETS))
    assert gen.eos_token_id == [1, 106]


def test_encode_adds_bos_like_gemma(tok):
    assert tok("2 + 2")["input_ids"][0] == 2
    assert tok.encode("2 + 2")[:1] == [2]
    assert 2 not in tok.encode("2 + 2", add_special_tokens=False)
    assert 1 not in tok.encode("2 + 2")  # no <eos> appended


def test_chat_template_single_user(tok, test_records):
    q = test_records[0]["question"]
    out = tok.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
    )
    assert out == f"<bos><start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n"


def test_chat_template_system_folded(tok):
    msgs = [
        {"role": "system", "content": "Answer with #### N."},
        {"role": "user", "content": "What is 2+3?"},
    ]
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert out == (
        "<bos><start_of_turn>user\nAnswer with #### N.\n\nWhat is 2+3?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_chat_template_multi_turn(tok):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
    ]
    out = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    assert out == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n"
    )
    # Content given as a list of typed parts renders the same.
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in msgs]
    assert tok.apply_chat_template(parts, tokenize=False) == out


@pytest.mark.parametrize(
    "msgs",
    [
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
        [{"role": "system", "content": "s"}],
    ],
)
def test_chat_template_rejects_bad_roles(tok, msgs):
    with pytest.raises(Exception, match="must"):
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_chat_template_tokenized(tok, test_records):
    q = test_records[1]["question"]
    msgs = [{"role": "user", "content": q}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert ids[:2] == [2, 105]
    assert ids.count(2) == 1  # the template's <bos> is not doubled
    assert ids[-3:] == [105] + tok.encode(
        "model\n", add_special_tokens=False
    )  # "model", "\n"
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == text


def test_round_trip_gsm8k(tok, test_records):
    extra = [
        "  leading and trailing spaces  ",
        "tabs\tand\n\nnewlines\r\n",
        "unicode: Janet\u2019s caf\u00e9 \u00bd \u20ac5 \u00d7 3 \u2014 \u6570\u5b66 \U0001f600",
        "<<16-3-4=9>>9\n#### 18",
    ]
    texts = (
        [r["question"] for r in test_records]
        + [r["answer"] for r in test_records]
        + extra
    )
    for text in texts:
        ids = tok.encode(text)
        assert ids[0] == 2
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert tok.decode(ids) == "<bos>" + text


def test_digits_one_per_token(tok, test_records):
    assert tok.tokenize("1234567890") == list("1234567890")
    for r in test_records:
        for text in (r["question"], r["answer"]):
            for piece in tok.tokenize(text):
                if any(c.isdigit() for c in piece):
                    assert len(piece) == 1 and piece.isdigit(), piece


def test_build_is_reproducible(tmp_path):
    """Rebuilding from the bundled train set reproduces the shipped tokenizer
    byte for byte."""
    subprocess.run(
        [
            sys.executable,
            str(BUILD_SCRIPT),
            "--train_path",
            str(BUNDLED_TRAIN_SET),
            "--out_dir",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name
