"""Stop sequences: strings that end an answer, matched on decoded text.

lm-eval's GSM8K tasks stop generation at strings such as `Question:` (the
model starting the next few-shot example), and its hf model also at the
text of the tokenizer's eos token. The text is cut here, per row, exactly
where lm-eval cuts it. Our sampler stops on token ids, so generation ends
early only where a row generates one of `stop_token_sequences` (each
decodes to text holding a stop string); a stop string made of other
tokens is generated past, up to an eos id or the length limit. Either way
the cut text is the same, and a row's own tokens alone decide where it
stops, so results stay batch invariant.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

__all__ = ["cut_at_stop_sequences", "stop_token_sequences", "with_eos_text"]

# Texts tokenized for each stop string: as it stands, and after a space
# (where a word-initial token carries the space).
_STOP_CONTEXTS = ("{}", " {}")


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


def stop_token_sequences(
    stops: Sequence[str], tokenizer
) -> tuple[tuple[int, ...], ...]:
    """Token sequences that may end generation for `stops`: the tokens of each
    stop string as it stands and after a space, where they decode (special
    tokens skipped, as completions are) to text holding the string. A row
    that ends with one has generated its stop string, and the rest of its
    text is cut anyway (`cut_at_stop_sequences`).

    Nothing (an empty tuple) where one stop string could begin before
    another's end and run past it (`ab` and `bc`, or `b` and `abc`):
    stopping at the first could then cut the text elsewhere than lm-eval.
    (A string overlapping itself, such as `\n\n`, is cut at its first
    occurrence either way.)
    """
    stops = [s for s in stops if s]
    for first, second in itertools.permutations(stops, 2):
        overhang = any(second.startswith(first[i:]) for i in range(1, len(first)))
        if overhang or first in second[1:]:
            return ()
    sequences = set()
    for stop in stops:
        for context in _STOP_CONTEXTS:
            ids = tokenizer.encode(context.format(stop), add_special_tokens=False)
            if ids and stop in tokenizer.decode(ids, skip_special_tokens=True):
                sequences.add(tuple(ids))
    # A sequence that ends with another stops no earlier than it.
    return tuple(
        sorted(
            s
            for s in sequences
            if not any(o != s and s[len(s) - len(o) :] == o for o in sequences)
        )
    )
