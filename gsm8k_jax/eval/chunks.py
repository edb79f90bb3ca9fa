"""Finished rollouts of a run in progress, as small immutable chunk files.

Cloud Storage objects cannot be appended to, so a run commits each group of
finished rollouts as a chunk of its own, in one atomic write
(`storage.write_atomic`): `<folder>/<process>-<seq>.jsonl`, with process
and sequence numbers zero-padded so that names sort in commit order. Each
process of a multi-host run writes only its own names, and numbers its
chunks on from the highest already there, so no chunk is ever rewritten: a
chunk once listed and read never changes, and is read once per process.

A chunk is read whole or not at all: one that does not end in a newline or
has a line that is not a JSON object (torn by a store that is not atomic,
or damaged) is skipped, and its rollouts are generated again. Write-in-
progress temporary files are never listed as chunks.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gsm8k_jax import stop_signals, storage

_CHUNK_NAME = re.compile(r"(?P<process>\d{4})-(?P<seq>\d{8})\.jsonl")


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"


# Fields of every rollout record that resuming and comparing read first: a
# chunk line without them was not written by a finished chunk.
_ROLLOUT_FIELDS = ("id", "sample_index", "response")


class DamagedLine(ValueError):
    """A line of a chunk or rollouts file that is not a rollout record; the
    message says what it is instead."""


def parse_rollout_line(line: str) -> dict[str, Any]:
    """The rollout record of one line of a chunk or rollouts file.

    Raises:
      DamagedLine: the line is not a JSON object with a rollout's fields
        (`id` and `sample_index` integers).
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DamagedLine(f"not valid JSON at column {e.colno}: {e.msg}") from e
    if not isinstance(record, dict):
        raise DamagedLine(f"a JSON {type(record).__name__}, not a rollout object")
    if missing := [f for f in _ROLLOUT_FIELDS if f not in record]:
        raise DamagedLine(f"a rollout without {', '.join(missing)}")
    if not all(isinstance(record[f], int) for f in ("id", "sample_index")):
        raise DamagedLine("a rollout whose id or sample_index is not an integer")
    return record


def jsonl_lines(text: str) -> list[str]:
    """A JSON Lines text's lines, each with its newline (the last may lack
    it). Split at newlines alone: a response may hold other line breaks
    (U+2028, U+0085), which JSON writes unescaped and str.splitlines splits at."""
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def _parse_whole(text: str) -> list[dict[str, Any]] | None:
    """A chunk's records, or None unless every line is a complete JSON
    object with a rollout's fields (a damaged chunk is done again)."""
    if not text.endswith("\n"):
        return None
    try:
        return [parse_rollout_line(line[:-1]) for line in jsonl_lines(text)]
    except DamagedLine:
        return None


class ChunkStore:
    """The chunk folder of one run, as seen by one process."""

    def __init__(self, folder: str, process_index: int = 0):
        self.folder = folder
        self.process_index = process_index
        self._next_seq: int | None = None
        self._read: dict[str, list[dict[str, Any]] | None] = {}

    def names(self) -> list[str]:
        """The committed chunks' names, in (process, seq) order."""
        return [n for n in storage.list_names(self.folder) if _CHUNK_NAME.fullmatch(n)]

    def commit(self, records: list[dict[str, Any]]) -> None:
        """Writes `records` as this process's next chunk, atomically; SIGTERM
        waits for the write to end."""
        if self._next_seq is None:
            mine = [
                int(m["seq"])
                for n in self.names()
                if (m := _CHUNK_NAME.fullmatch(n))
                and int(m["process"]) == self.process_index
            ]
            self._next_seq = max(mine, default=-1) + 1
        name = f"{self.process_index:04d}-{self._next_seq:08d}.jsonl"
        text = "".join(map(json_line, records))
        with stop_signals.finishing_write():
            storage.write_atomic(storage.join(self.folder, name), text)
        self._next_seq += 1
        self._read[name] = _parse_whole(text)

    def records(self) -> list[dict[str, Any]]:
        """Every complete chunk's records, in chunk order (each chunk read
        once: chunks never change)."""
        out: list[dict[str, Any]] = []
        for name in self.names():
            if name not in self._read:
                self._read[name] = _parse_whole(
                    storage.read_text(storage.join(self.folder, name))
                )
            out += self._read[name] or []
        return out

    def remove(self) -> None:
        """Removes the folder, temporary files included."""
        storage.remove(self.folder)
        self._next_seq = None
        self._read.clear()
