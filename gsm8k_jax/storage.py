"""Local folders and Cloud Storage (`gs://`): one small file API for both.

Paths are strings: a local path, or `gs://bucket/...`. Everything goes
through fsspec (gcsfs for `gs://`), so one code path serves both; only the
atomic write differs underneath: a local file is written to a temporary
name, fsync'ed and renamed over the target, while a single-object upload to
Cloud Storage is atomic by itself. Other schemes (`s3://`, ...) are refused
with a `StorageError` saying what is supported.

gcsfs retries a refused or timed-out connection six times with growing
pauses, for each request behind one file operation: an unreachable endpoint
(no network, a firewall, a stopped emulator) costs 40 to 50 s before any
error. One plain connection attempt to the same endpoint answers in seconds
(`require_reachable`).
"""

from __future__ import annotations

import functools
import os
import posixpath
import socket
import tempfile
import threading
import urllib.parse
import uuid
from collections.abc import Callable
from typing import IO

GCS_SCHEME = "gs://"
PROBE_TIMEOUT_S = 5.0
# How long writing and removing the empty gs:// probe object may take: an
# endpoint that accepts connections but never answers would hang forever.
WRITE_PROBE_TIMEOUT_S = 60.0
_CLOUD_STORAGE_URL = "https://storage.googleapis.com"


class StorageError(RuntimeError):
    """Storage cannot be reached or written, or the path's scheme is unsupported."""


def is_gcs(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(GCS_SCHEME)


def gcs_bucket(path: str | os.PathLike) -> str:
    """The bucket of a `gs://bucket/...` path."""
    return os.fspath(path)[len(GCS_SCHEME) :].split("/", 1)[0]


def emulator_url() -> str:
    """$STORAGE_EMULATOR_HOST, which gcsfs sends requests to instead of Cloud
    Storage; "" when unset (gcsfs also reads "default" as unset)."""
    url = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if url in ("", "default"):
        return ""
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


def storage_endpoint() -> tuple[str, int]:
    """The host and port gcsfs connects to."""
    url = urllib.parse.urlsplit(emulator_url() or _CLOUD_STORAGE_URL)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


@functools.cache
def _connect(host: str, port: int) -> None:
    """One TCP connection, opened and closed; cached, so a process checks an
    endpoint once (a failure raises, so it is not cached)."""
    socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()


def require_reachable(path: str | os.PathLike) -> None:
    """Raises StorageError within PROBE_TIMEOUT_S if `path` is on `gs://` and
    the storage endpoint refuses or does not answer a connection."""
    if not is_gcs(path):
        return
    host, port = storage_endpoint()
    try:
        _connect(host, port)
    except OSError as e:
        check = "STORAGE_EMULATOR_HOST" if emulator_url() else "your network connection"
        raise StorageError(
            f"Cannot reach Cloud Storage for {os.fspath(path)}: connecting to"
            f" {host}:{port} failed ({str(e) or type(e).__name__}). Check {check}."
        ) from None


def require_supported(path: str | os.PathLike) -> None:
    """Raises StorageError unless `path` is a local path or on `gs://`."""
    path = os.fspath(path)
    scheme = urllib.parse.urlsplit(path).scheme
    if "://" in path and not is_gcs(path) and scheme != "file":
        raise StorageError(
            f"Cannot use {path}: {scheme}:// storage is not supported; use a local"
            " folder or gs://bucket/folder."
        )


def filesystem(path: str):
    """The fsspec filesystem of `path` and the path as it names it; listings
    cached from earlier calls are dropped (another process may have written)."""
    import fsspec

    require_supported(path)
    require_reachable(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.invalidate_cache(fs_path)
    return fs, fs_path


def join(folder: str | os.PathLike, *names: str) -> str:
    """`folder/name/...`, with `/` on `gs://` and the OS's separator locally."""
    folder = os.fspath(folder)
    if is_gcs(folder):
        return posixpath.join(folder.rstrip("/"), *names)
    return os.path.join(folder, *names)


def basename(path: str | os.PathLike) -> str:
    """The last component of `path`."""
    path = os.fspath(path)
    if is_gcs(path):
        return posixpath.basename(path.rstrip("/"))
    return os.path.basename(path)


def parent(path: str | os.PathLike) -> str:
    """The folder holding `path`."""
    path = os.fspath(path)
    if is_gcs(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


def exists(path: str | os.PathLike) -> bool:
    fs, fs_path = filesystem(os.fspath(path))
    return fs.exists(fs_path)


def is_file(path: str | os.PathLike) -> bool:
    fs, fs_path = filesystem(os.fspath(path))
    return fs.isfile(fs_path)


def list_names(folder: str | os.PathLike) -> list[str]:
    """The names of the files and folders directly inside `folder`, sorted;
    [] when it does not exist."""
    fs, fs_path = filesystem(os.fspath(folder))
    try:
        entries = fs.ls(fs_path, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    names = {posixpath.basename(e.rstrip("/")) for e in entries}
    return sorted(n for n in names if n)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's contents; FileNotFoundError when there is none."""
    fs, fs_path = filesystem(os.fspath(path))
    return fs.cat_file(fs_path)


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def open_text(path: str | os.PathLike) -> IO[str]:
    """Opens a file for reading text."""
    fs, fs_path = filesystem(os.fspath(path))
    return fs.open(fs_path, "r", encoding="utf-8")


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes the whole file at once: readers, and a process killed mid-write,
    see the old contents (or none) or the new, never part of them.

    Locally: a temporary file beside it (`.<name>.<random>.tmp`, unique per
    writer, so concurrent writers never share one), fsync'ed, renamed over
    `path`. On `gs://`: one upload, atomic on Cloud Storage.
    """
    path = os.fspath(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    fs, fs_path = filesystem(path)
    if is_gcs(path):
        fs.pipe_file(fs_path, data)
        return
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of `write_atomic`'s temporary files (left
    behind only by a process killed mid-write)."""
    return name.startswith(".") and name.endswith(".tmp")


def remove(path: str | os.PathLike) -> None:
    """Removes a file, or a folder and everything in it; nothing if missing."""
    fs, fs_path = filesystem(os.fspath(path))
    if fs.exists(fs_path):
        fs.rm(fs_path, recursive=fs.isdir(fs_path))


def _within(seconds: float, fn: Callable[[], object]) -> None:
    """Runs `fn`, raising TimeoutError if it has not returned in `seconds`
    (it then goes on in a daemon thread, which the process does not wait for)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 (raised below, in the caller)
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError(f"no answer in {seconds:.0f} s")
    if outcome[0] is not None:
        raise outcome[0]


def require_writable(
    folder: str | os.PathLike,
    *,
    role: str = "output folder",
    flag: str = "--output_dir",
) -> None:
    """Raises StorageError, naming the folder (its `role`, set by `flag`) and
    the fix, unless files can be written into `folder`, leaving nothing
    behind: locally its nearest existing ancestor must be a folder that an
    empty probe folder can be made in (and is removed from at once); on
    `gs://` an empty probe object is written and removed. Any failure is one
    line: the folder, the reason in a few words, and to choose another `flag`."""
    folder = os.fspath(folder)
    if not folder:  # os.path would take it for the current folder.
        raise StorageError(f"{flag} is empty: name the {role}.")
    require_supported(folder)
    require_reachable(folder)
    try:
        if is_gcs(folder):
            probe = join(folder, f".write_probe_{uuid.uuid4().hex[:12]}")
            _within(
                WRITE_PROBE_TIMEOUT_S, lambda: (write_atomic(probe, b""), remove(probe))
            )
        else:
            _require_local_writable(folder)
    except Exception as e:  # gcsfs raises several types for auth/network errors.
        reason = (e.strerror if isinstance(e, OSError) else None) or str(e)
        reason = " ".join((reason or type(e).__name__).split())
        if is_gcs(folder) and isinstance(e, FileNotFoundError):
            reason = f"bucket gs://{gcs_bucket(folder)} does not exist"
        hint = (
            " Check the bucket's name and that your credentials may write to it."
            if is_gcs(folder)
            else ""
        )
        raise StorageError(
            f"Cannot write to {role} {folder}: {reason}.{hint} Choose another {flag}."
        ) from e


def _require_local_writable(folder: str) -> None:
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(20, f"{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(13, f"{existing} is not writable")
    # os.access answers for permissions alone, and root passes them all: a
    # read-only file system, or a folder that takes no new entries (/proc,
    # /sys), shows only on trying. Writing the output makes folders here.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write_probe_", dir=existing))
    except OSError as e:
        raise OSError(
            e.errno, f"cannot create a folder in {existing} ({e.strerror or e})"
        ) from e
