"""Cloud Storage objects written and removed on the condition of their
generation (`gs://` only).

Every write of an object gives it a new generation; a request conditioned
on `ifGenerationMatch` fails (HTTP 412) where the object is at another one
(0: where none exists). So of two processes that saw the same generation,
one write or removal wins and the other learns it lost: what a lease needs
(`eval.run_lease`). gcsfs's file API cannot send the condition, so these
go through its `call` to the JSON API, which the emulator of the tests
serves as well.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import urllib.parse

from gsm8k_jax import storage


def _object(path: str):
    """The gcsfs filesystem, bucket and object name of a `gs://` path (its
    cached listings dropped, as `storage.filesystem` does on every call)."""
    fs, fs_path = storage.filesystem(path)
    bucket, name, _ = fs.split_path(fs_path)
    return fs, bucket, name


def write_if(path: str, data: bytes, generation: int) -> int | None:
    """Writes the object where it is at `generation` (0: where none exists);
    returns its new generation, or None where it is at another."""
    fs, bucket, name = _object(path)
    # Where gcsfs itself uploads (its endpoint, however configured).
    upload = f"{fs._location}/upload/storage/v1/b/{urllib.parse.quote(bucket)}/o"
    try:
        written = fs.call(
            "POST",
            upload,
            uploadType="media",
            name=name,
            ifGenerationMatch=str(generation),
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            json_out=True,
        )
    except FileExistsError:  # 412: at another generation
        return None
    return int(written["generation"])


def read(path: str) -> tuple[bytes, int, float] | None:
    """The object's contents, generation, and seconds since that generation
    was written by Cloud Storage's own clock (against its response's Date);
    None where there is no object."""
    fs, bucket, name = _object(path)
    try:
        headers, metadata = fs.call("GET", "b/{}/o/{}", bucket, name)
        metadata = json.loads(metadata)
        _, data = fs.call(
            "GET",
            "b/{}/o/{}",
            bucket,
            name,
            alt="media",
            generation=metadata["generation"],
        )
    except FileNotFoundError:  # None, or removed between the two requests
        return None
    now = email.utils.parsedate_to_datetime(headers["Date"])
    if now.tzinfo is None:  # "-0000": UTC, source unknown
        now = now.replace(tzinfo=datetime.UTC)
    written = datetime.datetime.fromisoformat(metadata["updated"])
    return data, int(metadata["generation"]), (now - written).total_seconds()


def remove_if(path: str, generation: int) -> bool:
    """Removes the object where it is at `generation`; False where it is at
    another or gone."""
    fs, bucket, name = _object(path)
    try:
        fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=str(generation))
    except (FileExistsError, FileNotFoundError):
        return False
    return True
