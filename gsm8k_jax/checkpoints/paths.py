"""Local and `gs://` checkpoint paths, with errors that say what to fix.

Paths go through `etils.epath`, as Orbax's do, so one code path serves local
folders and Cloud Storage (through gcsfs). Storage errors on `gs://` paths
become `CheckpointError`s naming the bucket and how to get credentials.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from etils import epath

from gsm8k_jax.models.gemma3.params import CheckpointError
from gsm8k_jax.storage import GCS_SCHEME, gcs_bucket, is_gcs, require_reachable

_CREDENTIALS_HINT = (
    "Check the bucket name, that your account may read it, and your"
    " credentials: run `gcloud auth application-default login` or set"
    " GOOGLE_APPLICATION_CREDENTIALS to a service account key file."
)

T = TypeVar("T")


def storage_call(path: str | os.PathLike, fn: Callable[[], T]) -> T:
    """Runs `fn` (file system work on `path`); turns GCS failures into clear errors.

    A missing object is not a failure (FileNotFoundError passes through);
    anything else on `gs://` (no credentials, permission denied, network) is
    reported with the bucket's name. Messages from the storage client carry
    no credentials. Unreachable storage fails in seconds (StorageError), not
    after gcsfs's retries.
    """
    require_reachable(path)
    try:
        return fn()
    except FileNotFoundError:
        raise
    except Exception as e:
        if not is_gcs(path):
            raise
        raise CheckpointError(
            f"Cannot read {path}: {type(e).__name__}: {e}. Bucket"
            f" gs://{gcs_bucket(path)} is unreachable or unreadable."
            f" {_CREDENTIALS_HINT}"
        ) from e


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (Orbax refuses relative ones); gs:// unchanged."""
    path = os.fspath(path)
    return path if is_gcs(path) else os.path.abspath(path)


def existing_path(path: str | os.PathLike, what: str) -> epath.Path:
    """`path` as an epath.Path, or a CheckpointError saying why it cannot be read.

    Args:
      path: a local path or `gs://bucket/...`.
      what: what the caller expected there, for the message
        (e.g. "LoRA checkpoint").
    """
    if not os.fspath(path):
        raise CheckpointError(f"Empty {what} path.")
    epath_path = epath.Path(absolute(path))
    if storage_call(path, epath_path.exists):
        return epath_path
    if is_gcs(path):
        bucket = f"{GCS_SCHEME}{gcs_bucket(path)}"
        if not storage_call(bucket, epath.Path(bucket).exists):
            raise CheckpointError(
                f"Cannot read {what} {path}: bucket {bucket} does not exist or is"
                f" not visible to your credentials. {_CREDENTIALS_HINT}"
            )
    raise CheckpointError(f"No {what} at {path}: the path does not exist.")
