"""Build the small offline tokenizer shipped for the `gemma3-tiny` model.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on the
GSM8K train split. It mimics what matters of Gemma 3's tokenizer:

* special ids: `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, `<mask>`=4,
  fillers `<unused0>`..`<unused99>` at 5..104, `<start_of_turn>`=105,
  `<end_of_turn>`=106; the learnt vocabulary starts at 107;
* digits are always split one per token (`Digits(individual_digits=True)`);
* encoding plain text with `add_special_tokens=True` prepends `<bos>`;
* a chat template producing Gemma's turn format
  (`<bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n`);
* `generation_config.json` stops on `[<eos>, <end_of_turn>]`.

Byte-level BPE (no normalizer) makes `decode(encode(text))` exact for any
Unicode text. Training is deterministic; the output files contain no
timestamps or versions, so re-running the script reproduces them byte for byte.

Usage (from the repository root):

    python research/script/build_tiny_tokenizer.py
    python research/script/build_tiny_tokenizer.py --out_dir /tmp/tok --max_examples 500
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from gsm8k_jax.eval.data import BUNDLED_TRAIN_SET

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_TRAIN = BUNDLED_TRAIN_SET
DEFAULT_OUT = REPO_ROOT / "gsm8k_jax" / "assets" / "gemma3_tiny"
DEFAULT_VOCAB_SIZE = 4096

PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
NUM_UNUSED = 100  # ids 5..104, so that <start_of_turn> lands on 105 like Gemma 3.
SPECIAL_TOKENS = (
    [PAD, EOS, BOS, UNK, MASK]
    + [f"<unused{i}>" for i in range(NUM_UNUSED)]
    + [START_OF_TURN, END_OF_TURN]
)
assert SPECIAL_TOKENS.index(START_OF_TURN) == 105
assert SPECIAL_TOKENS.index(END_OF_TURN) == 106

# Gemma-style turn format. A leading system message is folded into the first
# user turn ("{system}\n\n{user}"); "assistant" is rendered as "model"; turn
# contents are stripped of surrounding whitespace (as Gemma's own template
# does); roles must alternate user/assistant starting with user.
CHAT_TEMPLATE = """\
{%- macro text_of(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set prefix = text_of(messages[0]['content']) + '\\n\\n' -%}
{%- set turns = messages[1:] -%}
{%- if not turns -%}{{- raise_exception('A system message must be followed by a user message.') -}}{%- endif -%}
{%- else -%}
{%- set prefix = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in turns -%}
{%- if loop.index0 % 2 == 0 -%}
{%- if message['role'] != 'user' -%}{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/... starting with user (after an optional system message).') -}}{%- endif -%}
{%- set role = 'user' -%}
{%- else -%}
{%- if message['role'] not in ['assistant', 'model'] -%}{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/... starting with user (after an optional system message).') -}}{%- endif -%}
{%- set role = 'model' -%}
{%- endif -%}
{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + (text_of(message['content']) | trim) + '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}
"""


def iter_texts(train_path: pathlib.Path, max_examples: int | None) -> Iterator[str]:
    """Yields the first `max_examples` records, each rendered as a chat exchange.

    Wrapping question and answer in the turn format lets BPE learn `user` and
    `model` as single tokens, as in Gemma (the turn markers themselves are
    special tokens and are split off before training).
    """
    with open(train_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if max_examples is not None and i >= max_examples:
                break
            record = json.loads(line)
            yield (
                f"{START_OF_TURN}user\n{record['question']}{END_OF_TURN}\n"
                f"{START_OF_TURN}model\n{record['answer']}{END_OF_TURN}\n"
            )


def build_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Trains the byte-level BPE with Gemma-compatible special ids."""
    tok = Tokenizer(
        models.BPE()
    )  # Byte-level: every byte is in the vocab, no <unk> needed.
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,  # ids 0..106, in this order.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    # Like Gemma: `<bos>` is prepended when add_special_tokens=True, no `<eos>`.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))],
    )
    return tok


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(
        json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def write_assets(tok: Tokenizer, out_dir: pathlib.Path) -> None:
    """Writes tokenizer.json and the transformers config files into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compact JSON keeps the file small; ordering is fixed by ids.
    (out_dir / "tokenizer.json").write_text(
        tok.to_str(pretty=False) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "mask_token": MASK,
    }
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            # Generic fast tokenizer: `GemmaTokenizer` would, in transformers v5,
            # rebuild the backend with Gemma's SentencePiece-style pipeline and
            # throw away our byte-level pre-tokenizer and decoder.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "padding_side": "left",
            "model_max_length": 32768,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(out_dir / "special_tokens_map.json", special)
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train_path",
        type=pathlib.Path,
        default=DEFAULT_TRAIN,
        help="GSM8K train jsonl with 'question' and 'answer' fields.",
    )
    parser.add_argument(
        "--out_dir",
        type=pathlib.Path,
        default=DEFAULT_OUT,
        help="Folder to write the tokenizer files into.",
    )
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="Total vocabulary size, special tokens included.",
    )
    parser.add_argument(
        "--max_examples",
        type=int,
        default=None,
        help="Train on only the first N records (for quick tests).",
    )
    args = parser.parse_args(argv)

    texts = list(iter_texts(args.train_path, args.max_examples))
    tok = build_tokenizer(texts, args.vocab_size)
    write_assets(tok, args.out_dir)
    print(
        f"wrote {args.out_dir} (vocab size {tok.get_vocab_size()}, {len(texts)} texts)"
    )


if __name__ == "__main__":
    main()
