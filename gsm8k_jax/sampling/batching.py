"""The shapes of continuous batching, and the host-side slot scheduler.

Batch invariance rests on one rule: every program the model runs has a
shape fixed by constants and by the prompt's own length, never by the
batch size, the queue or the neighbours, because XLA picks kernels (and so
the order of floating-point sums) by shape. So:

- a prompt is left-padded to its own bucket (`prompt_bucket`), never to the
  longest prompt of its batch;
- prompts of one bucket are prefilled `prefill_rows(bucket, ...)` rows at a
  time (per data shard), padding the group with empty rows when fewer wait;
- decode runs `row_tile` slots at a time (per data shard); the number of
  slots is rounded up to whole tiles.

Within a fixed-shape program a row's result does not depend on its
position, which the tests check bitwise.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax

MIN_PROMPT_BUCKET = 32
# Slots per decode program and data shard. Decode reads every weight once
# per tile, so a tile should be about as many rows as the device serves in
# the time it takes to read the weights (its FLOP/byte ridge): the default
# GSM8K batch on CPU, the bf16 ridge of an H100/H200 (~160-300 rows) and of
# a TPU v5e (~240) on accelerators.
ROW_TILES = {"cpu": 32, "gpu": 128, "tpu": 256}
# Prompt tokens per prefill program and data shard. A group is padded with
# empty rows when fewer prompts of its bucket wait, so it should be no
# bigger than keeps the device busy: a CPU is compute-bound from a few
# prompts on (4,096 tokens made a batch of 8 prompts pay for 32), an
# accelerator wants thousands of tokens per program.
PREFILL_TOKENS = {"cpu": 1024, "gpu": 4096, "tpu": 8192}


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two, at least MIN_PROMPT_BUCKET.

    Finer buckets (2^k and 1.5 * 2^k) pad the GSM8K test prompts 15% instead
    of 28%, but measured slower through the eval CLI (1.15x the wall time,
    paired runs on 64 problems at hf-small): twice the prefill programs to
    trace, and groups of more sizes leave slots idle for a whole wave.
    """
    return max(MIN_PROMPT_BUCKET, 1 << max(length - 1, 0).bit_length())


def bucket_ladder(up_to: int = 1024) -> list[int]:
    """Every prompt bucket up to `up_to` tokens: which shapes prompts take
    (a run resumed under other buckets would mix results of other programs)."""
    return sorted({prompt_bucket(n) for n in range(1, up_to + 1)})


def _of_platform(table: dict[str, int], platform: str | None) -> int:
    return table.get(platform or jax.default_backend(), table["gpu"])


def default_row_tile(platform: str | None = None) -> int:
    """The decode tile for a JAX platform (default: the default backend's)."""
    return _of_platform(ROW_TILES, platform)


def default_prefill_tokens(platform: str | None = None) -> int:
    """Prompt tokens per prefill program for a JAX platform."""
    return _of_platform(PREFILL_TOKENS, platform)


def prefill_rows(bucket: int, row_tile: int, prefill_tokens: int) -> int:
    """Prompts per prefill program and data shard for one prompt bucket."""
    return max(1, min(row_tile, prefill_tokens // bucket))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class SlotScheduler:
    """Which waiting rows to prefill into which free slots, and when.

    Rows wait sorted by prompt bucket (shortest first), so groups fill up.
    A group is prefilled once enough slots are free for all of it, or when
    nothing else would run; decode meanwhile returns only when that many
    slots are free (`min_free`), not at every finished sequence.
    """

    def __init__(
        self,
        buckets: Sequence[int],
        *,
        num_slots: int,
        row_tile: int,
        prefill_tokens: int,
        data_shards: int = 1,
    ):
        self.buckets = list(buckets)
        self.row_tile = row_tile
        self.prefill_tokens = prefill_tokens
        self.data_shards = data_shards
        self.waiting = collections.deque(
            sorted(range(len(buckets)), key=lambda row: (buckets[row], row))
        )
        self.owner: list[int | None] = [None] * num_slots

    @property
    def free_slots(self) -> list[int]:
        return [slot for slot, row in enumerate(self.owner) if row is None]

    @property
    def idle(self) -> bool:
        """Nothing decoding and nothing waiting: the work is done."""
        return not self.waiting and all(row is None for row in self.owner)

    def group_size(self, bucket: int) -> int:
        """Rows of one prefill program for `bucket`, over all data shards."""
        return prefill_rows(bucket, self.row_tile, self.prefill_tokens) * self.data_shards

    def _wanted(self) -> tuple[int, int]:
        """(bucket, rows) of the next group: the head's bucket, as many of it
        as wait, up to a whole group."""
        bucket = self.buckets[self.waiting[0]]
        same = 0
        for row in self.waiting:
            if self.buckets[row] != bucket:
                break
            same += 1
        return bucket, min(same, self.group_size(bucket))

    def next_group(self) -> tuple[int, list[tuple[int, int]]] | None:
        """(bucket, [(row, slot), ...]) to prefill now, or None to decode first."""
        if not self.waiting:
            return None
        bucket, wanted = self._wanted()
        free = self.free_slots
        decoding = len(free) < len(self.owner)
        if len(free) < wanted and (decoding or not free):
            return None
        group = [(self.waiting.popleft(), slot) for slot in free[:wanted]]
        for row, slot in group:
            self.owner[slot] = row
        return bucket, group

    def min_free(self) -> int:
        """Free slots at which decode should hand back to the host."""
        if not self.waiting:
            return len(self.owner) + 1  # never: decode until all are done
        return self._wanted()[1]

    def release(self, slot: int) -> int:
        """Frees a finished slot; returns the row it held."""
        row = self.owner[slot]
        self.owner[slot] = None
        return row
