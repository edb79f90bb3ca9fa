"""Stop sequences: strings that end an answer, matched on decoded text.

lm-eval's GSM8K tasks stop generation at strings such as `Question:` (the
model starting the next few-shot example), and its hf model also at the
text of the tokenizer's eos token. Our sampler stops on token ids only, so
it generates to an eos id or the length limit and the text is cut here,
per row, exactly where lm-eval cuts it. That keeps results batch invariant;
the cost is the tokens generated past a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["cut_at_stop_sequences", "with_eos_text"]


def with_eos_text(until: Sequence[str], tokenizer) -> list[str]:
    """`until` plus the eos token's text, as lm-eval's hf model stops on it
    (its logged `until` does not show it)."""
    stops = list(until)
    eos = tokenizer.decode(tokenizer.eos_token_id, skip_special_tokens=False)
    if eos not in stops:
        stops.append(eos)
    return stops


def cut_at_stop_sequences(text: str, stops: Sequence[str]) -> str:
    """`text` before its stop sequences, cut as lm-eval cuts it: at each
    non-empty stop in turn, in the given order (with overlapping stops this
    can differ from cutting at the earliest one)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
