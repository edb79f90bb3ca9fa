"""What produced a run's results, as its summary records it: the library
versions, this checkout's git commit and the devices."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import jax

_VERSIONED_PACKAGES = (
    "gsm8k_jax",
    "jax",
    "jaxlib",
    "flax",
    "transformers",
    "qwix",
    "orbax-checkpoint",
)


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    versions["gsm8k_jax_commit"] = project_commit()
    return versions


@functools.cache
def project_commit() -> str | None:
    """The git commit of this gsm8k_jax checkout, `-dirty` when tracked files
    changed; None for an install that is not a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        return None  # Installed as a package: no checkout of ours around it.

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def run_metadata(tag: str, run_info: dict[str, Any]) -> dict[str, Any]:
    """A summary's record of its run: tag, run record, versions, devices."""
    return {
        "tag": tag,
        "run": run_info,
        "versions": library_versions(),
        "devices": [str(d) for d in jax.local_devices()],
    }
