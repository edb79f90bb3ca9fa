"""The shapes of continuous batching, and the host-side slot scheduler.

Batch invariance rests on one rule: every program the model runs has a
shape fixed by constants, never by the batch size, the queue or the
neighbours, because XLA picks kernels (and so the order of floating-point
sums) by shape. So:

- a prompt is left-padded to whole chunks of `prefill_chunk` tokens (its
  own length decides how many), never to the longest prompt of its batch;
- prefill runs one chunk of `default_prefill_rows` prompts per program
  (per data shard), padding the group with empty rows when fewer wait; a
  prompt of n chunks takes n calls, not necessarily successive, each
  attending over what its slot holds (the other rows of a call may be at
  other chunks);
- decode runs `row_tile` slots at a time (per data shard); the number of
  slots is rounded up to whole tiles.

Within a fixed-shape program a row's result does not depend on its
position, which the tests check bitwise.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax

# Slots per decode program and data shard. Decode reads every weight once
# per tile, so a tile should be about as many rows as the device serves in
# the time it takes to read the weights (its FLOP/byte ridge): the default
# GSM8K batch on CPU, the bf16 ridge of an H100/H200 (~160-300 rows) and of
# a TPU v5e (~240) on accelerators.
ROW_TILES = {"cpu": 32, "gpu": 128, "tpu": 256}
# Prompt tokens per row of a prefill program: a prompt is padded to whole
# chunks, so shorter chunks pad less; a CPU computes a program of 8 x 32
# tokens at the rate of a bigger one (its matmuls are compute-bound from a
# few hundred rows on), an accelerator wants thousands of tokens per program.
PREFILL_CHUNKS = {"cpu": 32, "gpu": 128, "tpu": 256}
# Prompts per prefill program and data shard (at most a decode tile). A
# group is padded with empty rows when fewer prompts wait, and the slots of
# a whole group are freed before it runs, so it should be no bigger than
# keeps the device busy.
PREFILL_ROWS = {"cpu": 8, "gpu": 32, "tpu": 32}


def _of_platform(table: dict[str, int], platform: str | None) -> int:
    return table.get(platform or jax.default_backend(), table["gpu"])


def default_row_tile(platform: str | None = None) -> int:
    """The decode tile for a JAX platform (default: the default backend's)."""
    return _of_platform(ROW_TILES, platform)


def default_prefill_chunk(platform: str | None = None) -> int:
    """Prompt tokens per prefill row for a JAX platform."""
    return _of_platform(PREFILL_CHUNKS, platform)


def default_prefill_rows(
    row_tile: int | None = None, platform: str | None = None
) -> int:
    """Prompts per prefill program and data shard for a JAX platform, at
    most `row_tile` (None: the platform's rows, uncapped)."""
    rows = _of_platform(PREFILL_ROWS, platform)
    return rows if row_tile is None else min(row_tile, rows)


def num_chunks(length: int, chunk: int) -> int:
    """Prefill calls a prompt of `length` tokens takes."""
    return -(-length // chunk)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class SlotScheduler:
    """Which waiting rows to prefill into which free slots, and when.

    Prefill runs in bursts of calls, each call one chunk of up to
    `group_size` rows. A burst starts once enough slots are free for a
    whole group (or when nothing else would run): it gives every free slot
    a waiting row (longest first), and each of its calls runs the next
    chunk of the rows with the most chunks left, until every row has its
    whole prompt. A row's chunks need not run in successive calls (its slot
    keeps what it has), so the burst takes the fewest calls there can be:
    its chunks over the group, or its longest prompt, whichever is more.
    Decode meanwhile returns only when a group's worth of slots is free
    (`min_free`), not at every finished sequence.
    """

    def __init__(self, chunks: Sequence[int], *, num_slots: int, group_size: int):
        self.chunks = list(chunks)
        self.group_size = group_size
        self.waiting = collections.deque(
            sorted(range(len(chunks)), key=lambda row: (-chunks[row], row))
        )
        self.owner: list[int | None] = [None] * num_slots
        self.next_chunk: dict[int, int] = {}  # slot -> its row's next chunk

    @property
    def free_slots(self) -> list[int]:
        return [slot for slot, row in enumerate(self.owner) if row is None]

    @property
    def idle(self) -> bool:
        """Nothing decoding and nothing waiting: the work is done."""
        return not self.waiting and all(row is None for row in self.owner)

    def _wanted(self) -> int:
        """Free slots a burst waits for (while others decode): as many as
        rows wait, up to a whole group. The burst then takes every free slot."""
        return min(len(self.waiting), self.group_size)

    def _starts_burst(self) -> bool:
        free = len(self.free_slots)
        decoding = free < len(self.owner)
        return bool(self.waiting) and (
            free >= self._wanted() or (free and not decoding)
        )

    def _chunks_left(self, slot: int) -> int:
        return self.chunks[self.owner[slot]] - self.next_chunk[slot]

    def next_call(self) -> list[tuple[int, int, int]] | None:
        """[(row, slot, chunk index), ...] to prefill now, or None to decode
        first. A row's last chunk starts its sequence."""
        if not self.next_chunk and self._starts_burst():
            for slot in self.free_slots[: len(self.waiting)]:
                self.owner[slot] = self.waiting.popleft()
                self.next_chunk[slot] = 0
        slots = sorted(self.next_chunk, key=lambda s: (-self._chunks_left(s), s))
        call = []
        for slot in slots[: self.group_size]:
            row, k = self.owner[slot], self.next_chunk[slot]
            call.append((row, slot, k))
            if k + 1 < self.chunks[row]:
                self.next_chunk[slot] = k + 1
            else:
                del self.next_chunk[slot]
        return call or None

    def min_free(self) -> int:
        """Free slots at which decode should hand back to the host."""
        if not self.waiting:
            return len(self.owner) + 1  # never: decode until all are done
        return self._wanted()

    def release(self, slot: int) -> int:
        """Frees a finished slot; returns the row it held."""
        row = self.owner[slot]
        self.owner[slot] = None
        return row
