"""Batched generation over a Gemma 3 model: prompts in, completions out.

The host side of sampling: tokenises, left-pads into a bucketed length,
derives one random key per (example id, sample index), runs the jitted
program in `decode.py` and turns its arrays back into `Completion`s.
Results do not depend on batch size, row order or padding: the masks and
positions come from explicit validity, and each row's randomness from its
own key.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.sampling.decode import DecodeSettings, generate

MIN_PROMPT_BUCKET = 32
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
    finish_reason: Literal["eos", "length"]
    logprob: float  # sum of log-probs of the chosen tokens under the model


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two, at least MIN_PROMPT_BUCKET."""
    return max(MIN_PROMPT_BUCKET, 1 << max(length - 1, 0).bit_length())


def row_key(seed: int, example_id: int, sample_index: int) -> jax.Array:
    """The random key of sample j of example i: a function of (seed, i, j) alone."""
    key = jax.random.fold_in(jax.random.key(seed), example_id)
    return jax.random.fold_in(key, sample_index)


class Sampler:
    """Generates completions for batches of prompts with a KV cache.

    Args:
      model: the Gemma 3 model (its current weights are used at each call).
      tokenizer: a Hugging Face tokenizer for text prompts and decoding.
    """

    def __init__(self, model: Gemma3, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        )
        graphdef, _ = nnx.split(model)
        self._generate = jax.jit(
            functools.partial(generate, graphdef),
            static_argnames=("max_steps", "pad_id"),
        )

    @property
    def num_compilations(self) -> int:
        """How many programs were compiled so far (one per distinct shape)."""
        return self._generate._cache_size()

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt. Text is used as is (chat-templated text keeps
        its own <bos>); a bos is prepended when the text lacks one."""
        if not isinstance(prompt, str):
            return list(prompt)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        return ids if bos is None or ids[:1] == [bos] else [bos, *ids]

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams = SamplingParams(),
        *,
        example_ids: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> list[Completion]:
        """Generates `params.num_samples` completions per prompt, in one batch.

        example_ids identify prompts for their random keys (default 0..n-1).
        batch_size pads the batch with empty rows to a fixed number of rows
        (prompts x samples), so a short last batch reuses the compiled program.
        """
        if not prompts:
            return []
        example_ids = (
            list(range(len(prompts))) if example_ids is None else list(example_ids)
        )
        if len(example_ids) != len(prompts):
            raise ValueError(
                f"{len(prompts)} prompts but {len(example_ids)} example_ids."
            )
        encoded = [self.encode(p) for p in prompts]
        if any(not ids for ids in encoded):
            raise ValueError("Empty prompt: every prompt needs at least one token.")
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.num_samples)]
        num_rows = batch_size or len(rows)
        if num_rows < len(rows):
            raise ValueError(
                f"batch_size={batch_size} rows cannot hold {len(prompts)} prompts x"
                f" {params.num_samples} samples."
            )

        width = prompt_bucket(max(len(ids) for ids in encoded))
        tokens = np.full((num_rows, width), self.pad_id, np.int32)
        valid = np.zeros((num_rows, width), bool)
        keys = [row_key(params.seed, 0, 0)] * num_rows  # padding rows: any key
        for r, (i, j) in enumerate(rows):
            ids = encoded[i]
            tokens[r, width - len(ids) :] = ids
            valid[r, width - len(ids) :] = True
            keys[r] = row_key(params.seed, example_ids[i], j)

        eos = np.full((MAX_EOS_IDS,), -1, np.int32)
        eos[: len(params.eos_ids)] = params.eos_ids
        settings = DecodeSettings(
            eos_ids=jnp.asarray(eos),
            temperature=jnp.float32(params.temperature),
            top_k=jnp.int32(params.top_k),
            top_p=jnp.float32(params.top_p),
        )
        out = self._generate(
            nnx.state(self.model),
            jnp.asarray(tokens),
            jnp.asarray(valid),
            jnp.stack(keys),
            settings,
            max_steps=params.max_generation_steps,
            pad_id=self.pad_id,
        )
        out = jax.device_get(out)

        completions = []
        for r, (i, j) in enumerate(rows):
            n = int(out.num_tokens[r])
            hit_eos = bool(out.hit_eos[r])
            generated = out.tokens[r, :n].tolist()
            text_ids = generated[:-1] if hit_eos else generated
            completions.append(
                Completion(
                    example_id=example_ids[i],
                    sample_index=j,
                    text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                    tokens=generated,
                    num_tokens=n,
                    finish_reason="eos" if hit_eos else "length",
                    logprob=float(out.logprob[r]),
                )
            )
        return completions
