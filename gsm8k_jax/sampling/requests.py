"""What a caller asks the sampler for, checked before any work: one clear
error per problem, where the device would silently clamp, reorder or run
to the wrong length instead."""

from __future__ import annotations

import collections
from collections.abc import Sequence


def repeated_ids(ids: Sequence[int]) -> list[int]:
    """The ids that occur more than once, in order of first occurrence."""
    return [i for i, n in collections.Counter(ids).items() if n > 1]


def checked_example_ids(
    example_ids: Sequence[int] | None, num_prompts: int
) -> list[int]:
    """One id per prompt (default 0..n-1), none repeated: an id picks the
    prompt's random keys and its place in the results."""
    ids = list(range(num_prompts)) if example_ids is None else list(example_ids)
    if len(ids) != num_prompts:
        raise ValueError(f"{num_prompts} prompts but {len(ids)} example_ids.")
    if repeated := repeated_ids(ids):
        raise ValueError(
            f"example_ids {repeated[:5]} repeat: each prompt needs its own id"
            " (it picks the prompt's random keys and its place in the results)."
        )
    return ids


def check_prompt_tokens(encoded: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Every prompt holds a token, and only ids of the model's vocabulary (the
    embedding lookup would clamp others to its last row)."""
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError("Empty prompt: every prompt needs at least one token.")
        if min(ids) < 0 or max(ids) >= vocab_size:
            outside = sorted({t for t in ids if not 0 <= t < vocab_size})
            raise ValueError(
                f"Prompt {i} holds token ids {outside[:5]} outside the model's"
                f" vocabulary (0 to {vocab_size - 1}): a tokenizer of more tokens"
                " than the model's embedding, or ids from another model?"
            )


def token_limits(
    max_tokens: Sequence[int] | None, num_prompts: int, max_generation_steps: int
) -> list[int]:
    """The most tokens each prompt's completions may generate."""
    if max_tokens is None:
        return [max_generation_steps] * num_prompts
    limits = list(max_tokens)
    if len(limits) != num_prompts or not all(
        1 <= n <= max_generation_steps for n in limits
    ):
        raise ValueError(
            f"max_tokens needs one value in [1, max_generation_steps ="
            f" {max_generation_steps}] per prompt ({num_prompts})."
        )
    return limits


def check_context(
    prompt_lengths: Sequence[int], max_generation_steps: int, context: int
) -> None:
    """Every prompt and its completion fit the positions the model was trained
    for (beyond them it generates noise, slowly: the KV cache grows with the
    limit)."""
    longest = max(prompt_lengths)
    if longest + max_generation_steps > context:
        raise ValueError(
            f"A {longest}-token prompt plus up to {max_generation_steps} new tokens"
            f" goes past the model's context of {context} tokens"
            " (max_position_embeddings): lower max_generation_steps to at most"
            f" {max(context - longest, 0)}, or shorten the prompts."
        )
