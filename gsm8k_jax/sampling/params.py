"""What a caller asks of the sampler, and what it gives back.

`SamplingParams` (how to generate) and `Completion` (one generated
sequence) are plain host-side values (`decode.decode_settings` turns the
params into the traced arguments of the decode program).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

# Stop ids a call may give: the decode program takes a fixed-size array.
MAX_EOS_IDS = 8


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to generate. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_generation_steps: int = 768
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    seed: int = 0
    eos_ids: tuple[int, ...] = (1, 106)

    def __post_init__(self):
        if self.max_generation_steps < 1:
            raise ValueError(
                f"max_generation_steps must be >= 1, got {self.max_generation_steps}."
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}.")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {self.seed}.")
        if not isinstance(self.eos_ids, (tuple, list)):
            raise TypeError(
                f"eos_ids is a tuple of token ids, e.g. ({self.eos_ids},), got"
                f" {self.eos_ids!r}."
            )
        if not 1 <= len(self.eos_ids) <= MAX_EOS_IDS:
            raise ValueError(f"Give 1 to {MAX_EOS_IDS} eos ids, got {self.eos_ids}.")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated sequence."""

    example_id: int
    sample_index: int
    text: str  # decoded tokens before the eos, special tokens removed
    tokens: list[int]  # generated ids, including the final eos if any
    num_tokens: int
    # eos: an eos id (the last token); stop: a stop sequence (its last tokens)
    finish_reason: Literal["eos", "stop", "length"]
    logprob: float  # sum of log-probs of the chosen tokens under the model
