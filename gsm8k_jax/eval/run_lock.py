"""One process at a time per run: a second copy of a running command (a
second terminal, a job launched twice, on one machine or two) is refused in
one line instead of doing the same work again, and its `--overwrite` cannot
delete the results the first is committing. One process may take its own
lock again (a notebook evaluating the same run twice).

In a local folder a lock is an advisory `flock` on a small file beside the
results (`.lock_<tag>_p<process>`), which the operating system releases when
its process ends, however it ends (kill -9 included): a crashed run never
blocks its resume. The process holding it writes its pid and host into it,
for the refusal to name. On a file system without `flock` (some network and
FUSE mounts: a warning says so) nothing is checked.

`gs://` has no locks, so there the same object is a lease: created only
where none is (`storage.create_new`), written again every `HEARTBEAT_S`
seconds while its process runs, and removed when it ends. A process that
ends without removing it (kill -9, a lost machine) leaves a lease that
lapses `LEASE_S` seconds after its last heartbeat, or at once where its
holder's host is this one and the process is gone: a resume on the same
machine starts at once, one on another machine waits for the lapse (the
refusal says how long, and which object to delete instead).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
import warnings

from gsm8k_jax import storage

# A lease's heartbeat period, and how long after its last heartbeat it
# lapses (four missed heartbeats: a slow write or two do not end it).
HEARTBEAT_S = 30.0
LEASE_S = 4 * HEARTBEAT_S

# Lock files this process holds: real path -> open descriptor (closing it
# releases the lock).
_HELD: dict[str, int] = {}


@dataclasses.dataclass
class _Lease:
    """A lease this process holds on gs://, and its heartbeat."""

    token: str  # tells this holder's lease from a later one at the same path
    stop: threading.Event
    heartbeat: threading.Thread


# Leases this process holds: gs:// path -> lease.
_LEASES: dict[str, _Lease] = {}


class RunLockedError(RuntimeError):
    """Another process is running the same run in the same folder."""


def lock_path(output_dir: str, tag: str, process_index: int) -> str:
    return storage.join(output_dir, f".lock_{tag}_p{process_index}")


def acquire(output_dir: str, tag: str, process_index: int = 0) -> bool:
    """Takes the run's lock (its lease on gs://) for this process.

    Returns:
      Whether this call took it (False: already held here, or no locking).

    Raises:
      RunLockedError: another live process holds it.
    """
    if storage.is_gcs(output_dir):
        return _take_lease(output_dir, tag, process_index)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.realpath(lock_path(output_dir, tag, process_index))
    if path in _HELD:
        return False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                _running(tag, output_dir, f"process {holder}")
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            warnings.warn(
                f"{output_dir} cannot be locked ({e.strerror}): a second copy of"
                f" run '{tag}' would not be noticed.",
                stacklevel=2,
            )
            return False
        if _same_file(fd, path):
            break
        os.close(fd)  # Locked just as its holder removed it: open the new one.
    os.ftruncate(fd, 0)
    os.write(fd, f"{holder_name()}\n".encode())
    _HELD[path] = fd
    return True


def _running(tag: str, output_dir: str, holder: str) -> str:
    return (
        f"Run '{tag}' is already running in {output_dir} ({holder}): wait for it"
        " to finish or stop it (a rerun then resumes it), or use another"
        " --output_dir."
    )


def holder_name() -> str:
    """This process, as a refusal names it: its pid and host (a folder may be
    shared by several machines)."""
    return f"{os.getpid()} on {socket.gethostname()}"


def release(output_dir: str, tag: str, process_index: int = 0) -> None:
    """Releases and removes the run's lock, if this process holds it."""
    if storage.is_gcs(output_dir):
        _end_lease(lock_path(output_dir, tag, process_index))
        return
    path = os.path.realpath(lock_path(output_dir, tag, process_index))
    fd = _HELD.pop(path, None)
    if fd is None:
        return
    try:
        os.remove(path)  # Before unlocking: none locks a file being removed.
    except FileNotFoundError:
        pass  # Removed with its folder: nothing is left to release but the lock.
    finally:
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _take_lease(output_dir: str, tag: str, process_index: int) -> bool:
    """`acquire` on gs://: creates the lease object, or takes over a lapsed
    one, and starts its heartbeat."""
    path = lock_path(output_dir, tag, process_index)
    if path in _LEASES:
        return False
    token = uuid.uuid4().hex
    record = {"pid": os.getpid(), "host": socket.gethostname(), "token": token}
    data = json.dumps(record).encode()
    # Where another process removes a lapsed lease and creates its own
    # between our look and our creation, look again.
    for _ in range(3):
        if storage.create_new(path, data):
            break
        holder = _lease_holder(path)
        if holder is None:
            continue  # Released between our attempt and our look.
        held, age_s = holder
        if not _lapsed(held, age_s):
            who = (
                f"process {held.get('pid')} on {held.get('host')}, last heard"
                f" from {age_s:.0f} s ago"
            )
            raise RunLockedError(
                _running(tag, output_dir, who)
                + f" If it is gone (its machine lost), its lease lapses in"
                f" {LEASE_S - age_s:.0f} s, or delete {path}."
            )
        storage.remove(path)
    else:
        raise RunLockedError(
            f"Run '{tag}' in {output_dir}: another process keeps taking {path};"
            " is a second copy of this command starting?"
        )
    stop = threading.Event()
    heartbeat = threading.Thread(
        target=_beat, args=(path, data, token, stop), name="run lease", daemon=True
    )
    heartbeat.start()
    _LEASES[path] = _Lease(token, stop, heartbeat)
    return True


def _lease_holder(path: str) -> tuple[dict, float] | None:
    """The lease's record and seconds since its last heartbeat; None where
    there is no lease."""
    try:
        age_s = time.time() - storage.modified_time(path)
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        held = json.loads(raw)
    except ValueError:
        held = {}  # Damaged: only its age can end it.
    return (held if isinstance(held, dict) else {}), age_s


def _lapsed(held: dict, age_s: float) -> bool:
    """Whether a lease no longer holds: no heartbeat for LEASE_S seconds,
    or its process is gone from this host."""
    if age_s > LEASE_S:
        return True
    pid = held.get("pid")
    return (
        held.get("host") == socket.gethostname()
        and isinstance(pid, int)
        and not _alive(pid)
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Another user's process.
    return True


def _beat(path: str, data: bytes, token: str, stop: threading.Event) -> None:
    """Writes the lease again every HEARTBEAT_S seconds until `stop`, or
    until another process holds it (ours lapsed: a long network outage)."""
    while not stop.wait(HEARTBEAT_S):
        try:
            holder = _lease_holder(path)
            if holder is not None and holder[0].get("token") != token:
                return
            storage.write_atomic(path, data)
        except Exception:  # noqa: BLE001, S112 Missed: the next may get through.
            continue


def _end_lease(path: str) -> None:
    """Stops the lease's heartbeat and removes it, if this process holds it."""
    lease = _LEASES.pop(path, None)
    if lease is None:
        return
    lease.stop.set()
    lease.heartbeat.join()
    try:
        holder = _lease_holder(path)
        if holder is not None and holder[0].get("token") == lease.token:
            storage.remove(path)
    except Exception as e:  # noqa: BLE001 Results are safe; only the lease stays.
        warnings.warn(
            f"Could not remove {path} ({e}): a rerun elsewhere waits until it"
            f" lapses ({LEASE_S:.0f} s).",
            stacklevel=2,
        )
