"""Cloud Storage (`gs://`) paths, and a fast check that storage is reachable.

gcsfs retries a refused or timed-out connection six times with growing
pauses, for each request behind one file operation: an unreachable endpoint
(no network, a firewall, a stopped emulator) costs 40 to 50 s before any
error. One plain connection attempt to the same endpoint answers in seconds.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse

GCS_SCHEME = "gs://"
PROBE_TIMEOUT_S = 5.0
_CLOUD_STORAGE_URL = "https://storage.googleapis.com"


class StorageError(RuntimeError):
    """Cloud Storage cannot be reached."""


def is_gcs(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(GCS_SCHEME)


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
