"""Batched generation over a Gemma 3 model: prompts in, completions out.

The host side of sampling: tokenises, left-pads each prompt to whole
prefill chunks, feeds sequences into the slots of the jitted programs in
`decode.py` (continuous batching, scheduled by `batching.SlotScheduler`;
each sequence's random key comes from (seed, example id, sample index) on
device) and turns their arrays back into `Completion`s, while the device
decodes the next steps.
Results do not depend, to the bit, on batch size, row order, padding or the
number of data-parallel devices: the masks and positions come from explicit
validity, each row's randomness from its own key, and every program's shape
from constants and the row's own prompt (see `batching.py`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.gemma3.sharding import DATA, check_mesh, shard_model
from gsm8k_jax.sampling import requests, weight_layout
from gsm8k_jax.sampling.batching import (
    SlotScheduler,
    default_prefill_chunk,
    default_prefill_rows,
    default_row_tile,
    num_chunks,
    round_up,
)
from gsm8k_jax.sampling.decode import DecodeState, decode, decode_settings, prefill
from gsm8k_jax.sampling.params import Completion, SamplingParams

# Every rounding to bfloat16 that the program asks for happens: otherwise XLA
# may keep a fused intermediate in float32, and whether it fuses depends on
# shapes and surroundings, so the same row could round differently.
COMPILER_OPTIONS = {"xla_allow_excess_precision": False}
# Programs compiled at once by `Sampler.compile` (a run has one prefill and
# one decode).
COMPILE_THREADS = 2


class Sampler:
    """Generates completions for prompts with a KV cache and continuous batching.

    `batch_size` slots decode in parallel; when a sequence finishes, the next
    waiting prompt is prefilled into its slot without recompiling.

    Args:
      model: the Gemma 3 model (its current weights are used at each call).
      tokenizer: a Hugging Face tokenizer for text prompts and decoding.
      mesh: optional (data, model) device mesh (`models.gemma3.sharding`):
        slots are split over `data`, heads and MLP over `model`. Data
        parallelism keeps every row's arithmetic; tensor parallelism
        (`model` > 1) splits reductions, so results can differ from one
        device in the last bits.
      row_tile: slots per decode program and data shard (default: the
        platform's, `batching.ROW_TILES`). Results are bitwise the same at
        any batch size for a given row_tile, not across row_tiles.
    """

    def __init__(
        self,
        model: Gemma3,
        tokenizer,
        *,
        mesh: Mesh | None = None,
        row_tile: int | None = None,
    ):
        if mesh is not None:
            check_mesh(mesh)
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        if row_tile is not None and row_tile < 1:
            raise ValueError(
                f"row_tile must be >= 1 (None: the platform's), got {row_tile}."
            )
        self.row_tile = row_tile or default_row_tile()
        self.prefill_chunk = default_prefill_chunk()
        self.data_shards = mesh.shape[DATA] if mesh is not None else 1
        # Rows of every prefill program, over all data shards.
        self.prefill_group = default_prefill_rows(self.row_tile) * self.data_shards
        if mesh is not None:
            shard_model(model, mesh)
        # Decode iterations run by this sampler (all calls): each runs the
        # model once for every slot of every tile with a live slot; and the
        # tiles run, over all iterations (each reads every weight once).
        self.decode_steps = 0
        self.tile_steps = 0
        # Prompt tokens run by prefill programs, padding rows and columns
        # included (each call is `prefill_group` rows of `prefill_chunk`).
        self.prefilled_tokens = 0
        # Seconds spent by all calls in each phase: "prefill" (dispatch until
        # done), "decode" (waiting for its results), "host" (the rest:
        # scheduling, detokenising, and the caller's work between yields,
        # which overlaps the device's decoding).
        self.phase_seconds: collections.Counter[str] = collections.Counter()
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        )
        graphdef, _ = nnx.split(model)
        # The structure the programs are compiled for (a LoRA attached,
        # merged or detached later, or attached with another alpha, changes
        # it).
        self._graphdef = graphdef
        # Whether the programs take their weights `weight_layout.arrange`d.
        self._arranged = weight_layout.arranges()
        self._prefill = jax.jit(
            functools.partial(
                prefill, graphdef, arranged=self._arranged, mesh=self.mesh
            ),
            static_argnames="pad_id",
            donate_argnums=1,
            compiler_options=COMPILER_OPTIONS,
        )
        self._decode = jax.jit(
            functools.partial(
                decode,
                graphdef,
                row_tile=self.row_tile,
                data_shards=self.data_shards,
                arranged=self._arranged,
                mesh=self.mesh,
            ),
            static_argnames="pad_id",
            donate_argnums=1,
            compiler_options=COMPILER_OPTIONS,
        )

    @property
    def num_compilations(self) -> int:
        """Entries in the programs' dispatch caches: one per distinct shape
        called so far (a program `compile` built counts once it is called).
        Tests bound recompiling with it. On a mesh, prefill's call on the
        empty state adds an entry of its own, with no new trace or compile."""
        return self._prefill._cache_size() + self._decode._cache_size()

    def _program_weights(self) -> nnx.State:
        """The model's current weights as the programs take them: arranged
        for the platform's matmuls (`weight_layout`), once per call."""
        graphdef, weights = nnx.split(self.model)
        if graphdef != self._graphdef:
            raise ValueError(
                "The model changed structure since this Sampler was made (a LoRA"
                " attached, merged, detached or attached with another alpha?):"
                " make a new Sampler for it."
            )
        return weight_layout.arrange(weights) if self._arranged else weights

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
        max_prompt_len: int | None = None,
        max_tokens: Sequence[int] | None = None,
        stop_sequences: Sequence[Sequence[int]] = (),
    ) -> list[Completion]:
        """Generates `params.num_samples` completions per prompt, in prompt order.

        example_ids identify prompts for their random keys (default 0..n-1;
        one per prompt, none repeated).
        batch_size is the number of slots decoded in parallel (default: all
        prompts x samples at once), rounded up to whole row tiles.
        max_tokens caps each prompt's completions below
        `params.max_generation_steps` (like lm-evaluation-harness'
        per-request max_gen_toks).
        stop_sequences: token sequences that end a completion once it
        generates one (finish_reason "stop"; the sequence stays in its
        tokens and text), e.g. `eval.stopping.stop_token_sequences`.
        """
        stream = self.generate_stream(
            prompts,
            params,
            example_ids=example_ids,
            batch_size=batch_size,
            max_prompt_len=max_prompt_len,
            max_tokens=max_tokens,
            stop_sequences=stop_sequences,
        )
        completions = [c for finished in stream for c in finished]
        ids = range(len(prompts)) if example_ids is None else example_ids
        order = {e: i for i, e in enumerate(ids)}
        return sorted(completions, key=lambda c: (order[c.example_id], c.sample_index))

    def generate_stream(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams = SamplingParams(),
        *,
        example_ids: Sequence[int] | None = None,
        batch_size: int | None = None,
        max_prompt_len: int | None = None,
        max_tokens: Sequence[int] | None = None,
        stop_sequences: Sequence[Sequence[int]] = (),
    ) -> Iterator[list[Completion]]:
        """Like `generate`, but yields completions in groups as they finish.

        max_prompt_len: make room in the KV cache for prompts of up to this
        many tokens, so that calls with different prompt sets (a resumed
        run) share one compiled decode program.
        """
        if isinstance(prompts, str):  # Else one prompt per character.
            raise TypeError(
                "prompts is a single string: pass a list of prompts, e.g."
                " generate([prompt])."
            )
        if not prompts:
            return
        example_ids = requests.checked_example_ids(example_ids, len(prompts))
        encoded = [self.encode(p) for p in prompts]
        requests.check_prompt_tokens(encoded, self.model.config.vocab_size)
        limits = requests.token_limits(
            max_tokens, len(prompts), params.max_generation_steps
        )
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.num_samples)]
        state, schedule = self._empty_run(
            [len(ids) for ids in encoded], params, batch_size, max_prompt_len
        )
        settings = decode_settings(params, stop_sequences)
        stops = {tuple(sequence) for sequence in stop_sequences}
        weights = self._program_weights()
        steps_counted = (0, 0)  # this call's (decode_steps, tile_steps)
        clock = _PhaseClock(self.phase_seconds)
        # Each row is padded once, at its first chunk, not at every call.
        new_row = functools.cache(
            functools.partial(self._prefill_row, encoded, rows, example_ids, limits)
        )
        finished: list[_Finished] = []
        while True:
            clock.start()
            state = self._prefill_burst(weights, state, schedule, new_row, params.seed)
            jax.block_until_ready(state)
            clock.stop("prefill")
            if schedule.idle:
                if finished:
                    yield self._completions(finished, example_ids, stops)
                clock.start()
                return
            free_needed = np.int32(schedule.min_free())
            state = self._decode(
                weights, state, settings, free_needed, pad_id=self.pad_id
            )
            # The device decodes while the host turns the last return's
            # sequences into completions and the caller stores them.
            if finished:
                yield self._completions(finished, example_ids, stops)
            clock.start()
            done, num_tokens, hit_eos, logprob, steps = jax.device_get(
                (
                    state.done,
                    state.num_tokens,
                    state.hit_eos,
                    state.logprob,
                    (state.decode_steps, state.tile_steps),
                )
            )
            self.decode_steps += int(steps[0]) - steps_counted[0]
            self.tile_steps += int(steps[1]) - steps_counted[1]
            steps_counted = tuple(map(int, steps))
            slots = [
                slot
                for slot, row in enumerate(schedule.owner)
                if row is not None and done[slot]
            ]
            tokens = jax.device_get(state.tokens) if slots else None
            clock.stop("decode")
            finished = [
                _Finished(
                    row=rows[schedule.release(slot)],
                    tokens=tokens[slot, : num_tokens[slot]].tolist(),
                    hit_eos=bool(hit_eos[slot]),
                    logprob=float(logprob[slot]),
                )
                for slot in slots
            ]

    def _completions(
        self,
        finished: list[_Finished],
        example_ids: list[int],
        stops: set[tuple[int, ...]],
    ) -> list[Completion]:
        """Detokenised completions of finished sequences."""
        completions = []
        for f in finished:
            i, j = f.row
            text_ids = f.tokens[:-1] if f.hit_eos else f.tokens
            if f.hit_eos:
                reason = "eos"
            elif any(tuple(f.tokens[-len(stop) :]) == stop for stop in stops):
                reason = "stop"
            else:
                reason = "length"
            completions.append(
                Completion(
                    example_id=example_ids[i],
                    sample_index=j,
                    text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                    tokens=f.tokens,
                    num_tokens=len(f.tokens),
                    finish_reason=reason,
                    logprob=f.logprob,
                )
            )
        return completions

    def compile(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams = SamplingParams(),
        *,
        batch_size: int | None = None,
        max_prompt_len: int | None = None,
        stop_sequences: Sequence[Sequence[int]] = (),
    ) -> None:
        """Compiles the programs that `generate_stream` runs for the same
        arguments (the prefill and the decode loop) without running them:
        JAX keeps each executable, so the call that follows traces and
        compiles nothing. Timing after it excludes compilation."""
        if not prompts:
            return
        lengths = [len(self.encode(p)) for p in prompts]
        state, _ = self._empty_run(lengths, params, batch_size, max_prompt_len)
        weights = self._program_weights()
        # Tracing holds the GIL and XLA's compiler does not: each program
        # compiles in a thread while the next one traces.
        with concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS) as pool:
            args = self._chunk_args(state, [], 0)
            lowered = self._prefill.lower(weights, *args, pad_id=self.pad_id)
            compiling = [pool.submit(lowered.compile)]
            lowered = self._decode.lower(
                weights,
                state,
                decode_settings(params, stop_sequences),
                np.int32(0),
                pad_id=self.pad_id,
            )
            compiling.append(pool.submit(lowered.compile))
            for program in compiling:
                program.result()

    def _empty_run(
        self,
        prompt_lengths: Sequence[int],
        params: SamplingParams,
        batch_size: int | None,
        max_prompt_len: int | None,
    ) -> tuple[DecodeState, SlotScheduler]:
        """The empty decode state and slot schedule of a call, whose shapes
        depend on its arguments alone."""
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        requests.check_context(
            prompt_lengths,
            params.max_generation_steps,
            self.model.config.max_position_embeddings,
        )
        chunks = [
            num_chunks(n, self.prefill_chunk)
            for n in prompt_lengths
            for _ in range(params.num_samples)
        ]
        num_slots = round_up(
            batch_size or len(chunks), self.row_tile * self.data_shards
        )
        width = round_up(max(max_prompt_len or 0, *prompt_lengths), self.prefill_chunk)
        state = DecodeState.empty(
            self.model,
            num_slots,
            width,
            params.max_generation_steps,
            self.pad_id,
            self.prefill_chunk,
            self.mesh,
        )
        if self.mesh is None:
            # Committed to the weights' device, as every program output is
            # once any argument is committed (weights placed with
            # jax.device_put, a LoRA's factors): the programs `compile`
            # lowers then take the arguments a call passes them, however
            # the weights are placed. (On a mesh the state is placed as its
            # programs return it.)
            embedding = self.model.embedder.input_embedding.get_value()
            (device,) = embedding.devices()
            state = jax.device_put(state, device)
        schedule = SlotScheduler(
            chunks, num_slots=num_slots, group_size=self.prefill_group
        )
        return state, schedule

    def _prefill_burst(
        self,
        weights: nnx.State,
        state: DecodeState,
        schedule: SlotScheduler,
        new_row: Callable[[int, int], _PrefillRow],
        seed: int,
    ) -> DecodeState:
        """Runs the prefill calls the schedule asks for now, if any."""
        while (call := schedule.next_call()) is not None:
            members = [(new_row(row, slot), k) for row, slot, k in call]
            args = self._chunk_args(state, members, seed)
            state = self._prefill(weights, *args, pad_id=self.pad_id)
            self.prefilled_tokens += self.prefill_group * self.prefill_chunk
        return state

    def _prefill_row(
        self,
        encoded: list[list[int]],
        rows: list[tuple[int, int]],
        example_ids: list[int],
        limits: list[int],
        row: int,
        slot: int,
    ) -> _PrefillRow:
        """Row `row` (rows[row] = (prompt, sample)) in `slot`, as prefill
        takes it."""
        i, j = rows[row]
        ids = encoded[i]
        padded = [self.pad_id] * (-len(ids) % self.prefill_chunk) + ids
        return _PrefillRow(
            padded, len(padded) - len(ids), slot, example_ids[i], j, limits[i]
        )

    def _chunk_args(
        self, state: DecodeState, members: list[tuple[_PrefillRow, int]], seed: int
    ) -> tuple:
        """The prefill program's arguments (after the weights) for one call
        of `members` ([(row, chunk index)]), as one fixed-shape group;
        unused rows are dropped."""
        chunk, size = self.prefill_chunk, self.prefill_group
        tokens = np.full((size, chunk), self.pad_id, np.int32)
        pads = np.full((size,), chunk, np.int32)  # no valid token
        chunk_index = np.zeros((size,), np.int32)
        last = np.zeros((size,), bool)
        slots = np.full((size,), state.done.shape[0], np.int32)  # out of range
        ids_of_rows = np.zeros((size,), np.int32)
        samples = np.zeros((size,), np.int32)
        group_limits = np.ones((size,), np.int32)
        for g, (row, k) in enumerate(members):
            tokens[g] = row.tokens[k * chunk : (k + 1) * chunk]
            pads[g], chunk_index[g], slots[g] = row.pads, k, row.slot
            last[g] = (k + 1) * chunk == len(row.tokens)
            ids_of_rows[g], samples[g] = row.example_id, row.sample
            group_limits[g] = row.limit
        split = self._split_rows
        return (
            state,
            split(tokens),
            split(pads),
            split(chunk_index),
            split(last),
            split(slots),
            np.int32(seed),
            split(ids_of_rows),
            split(samples),
            split(group_limits),
        )

    def _split_rows(self, array: np.ndarray) -> jax.Array:
        """Puts a prefill group's rows over the data shards (each shard
        prefills as many of them as one device would)."""
        if self.mesh is None:
            return jax.device_put(array)
        return jax.device_put(array, NamedSharding(self.mesh, PartitionSpec(DATA)))


@dataclasses.dataclass(frozen=True)
class _PrefillRow:
    """A sequence waiting for its prefill chunks."""

    tokens: list[int]  # the prompt, left-padded to whole chunks
    pads: int  # how many of `tokens` are padding
    slot: int
    example_id: int
    sample: int  # sample index
    limit: int  # most tokens it may generate


@dataclasses.dataclass(frozen=True)
class _Finished:
    """A finished sequence, fetched from the device, not yet detokenised."""

    row: tuple[int, int]  # (prompt index, sample index)
    tokens: list[int]  # generated ids, including the final eos if any
    hit_eos: bool
    logprob: float


class _PhaseClock:
    """Adds the wall time of each timed phase to `totals[phase]`, and the time
    between phases (host work, the caller's included) to `totals["host"]`."""

    def __init__(self, totals: collections.Counter[str]):
        self.totals = totals
        self.mark = time.perf_counter()

    def stop(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self.mark
        self.mark = now

    def start(self) -> None:
        """Starts a timed phase; the time since the last one was host time."""
        self.stop("host")
