"""One process at a time per run: a second copy of a running command (a
second terminal, a job launched twice) is refused in one line instead of
doing the same work again, and its `--overwrite` cannot delete the results
the first is committing.

In a local folder a lock is an advisory `flock` on a small file beside the
results (`.lock_<tag>_p<process>`), which the operating system releases
when its process ends, however it ends (kill -9 included): a crashed run
never blocks its resume. The process holding it writes its pid and host
into it, for the refusal to name. On a file system without `flock` (some
network and FUSE mounts: a warning says so), nothing is checked. On `gs://`,
which has no locks, the same object is a lease (`run_lease`). One process
may take its own lock again (a notebook evaluating the same run twice).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import warnings
from collections.abc import Iterator

from gsm8k_jax import storage
from gsm8k_jax.eval import run_lease

# Lock files this process holds: real path -> open descriptor (closing it
# releases the lock).
_HELD: dict[str, int] = {}


class RunLockedError(RuntimeError):
    """Another process is running the same run in the same folder."""


def lock_path(output_dir: str, tag: str, process_index: int) -> str:
    return storage.join(output_dir, f".lock_{tag}_p{process_index}")


def acquire(output_dir: str, tag: str, process_index: int = 0) -> bool:
    """Takes the run's lock for this process (on gs://, its lease:
    `run_lease`).

    Returns:
      Whether this call took it (False: already held here, or no locking).

    Raises:
      RunLockedError: another live process holds it.
    """
    if storage.is_gcs(output_dir):
        with _lease_refusals():
            return run_lease.take(
                lock_path(output_dir, tag, process_index),
                f"Run '{tag}' is already running in {output_dir}",
            )
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
                f"Run '{tag}' is already running in {output_dir} (process"
                f" {holder}): wait for it to finish or stop it (a rerun then"
                " resumes it), or use another --output_dir."
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


def check_held(output_dir: str, tag: str, process_index: int = 0) -> None:
    """Raises RunLockedError where this process took the run on gs:// and
    another process has taken it over since (a local lock cannot be lost)."""
    if storage.is_gcs(output_dir):
        with _lease_refusals():
            run_lease.check_held(lock_path(output_dir, tag, process_index))


@contextlib.contextmanager
def _lease_refusals() -> Iterator[None]:
    """A lease's refusals (`run_lease.LeaseError`) as this module's."""
    try:
        yield
    except run_lease.LeaseError as e:
        raise RunLockedError(str(e)) from None


def holder_name() -> str:
    """This process, as a refusal names it: its pid and host (a folder may be
    shared by several machines)."""
    return f"{os.getpid()} on {socket.gethostname()}"


def release(output_dir: str, tag: str, process_index: int = 0) -> None:
    """Releases and removes the run's lock, if this process holds it."""
    if storage.is_gcs(output_dir):
        run_lease.release(lock_path(output_dir, tag, process_index))
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
