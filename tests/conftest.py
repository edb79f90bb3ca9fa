"""Shared pytest fixtures for gsm8k_jax tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

# Make `tests/` importable (e.g. `from gcs_emulator import upload_dir`) whatever
# the rootdir / import mode.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# Importing it early also sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false before
# anything imports gcsfs (see its docstring).
from gcs_emulator import running_gcs_emulator

from gsm8k_jax.compilation_cache import (
    default_compilation_cache_dir,
    enable_compilation_cache,
)

GCS_TEST_BUCKET = "gsm8k-jax-test"


@pytest.fixture(scope="session", autouse=True)
def package_cache(tmp_path_factory) -> Iterator[str]:
    """The package's cache folder ($GSM8K_JAX_CACHE: compiled programs,
    gs:// downloads) is this session's own (each xdist worker's): a run that
    a test kills mid-write, or another session, cannot leave entries that a
    later run reads (JAX writes its cache entries in place).

    The tests' own process compiles into the same cache as the eval CLI
    does: a Sampler's jitted programs are its own, so every sweep
    checkpoint's sampler, and every test building the same programs, would
    otherwise compile them again (about 9% of the suite's time)."""
    path = str(tmp_path_factory.mktemp("gsm8k_jax_cache"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GSM8K_JAX_CACHE", path)
        enable_compilation_cache(default_compilation_cache_dir())
        yield path


@pytest.fixture(scope="session")
def gcs_bucket() -> Iterator[str]:
    """`gs://<bucket>` served by an in-process GCS emulator for the session.

    The bucket is shared by every test in the session: write under a
    test-specific prefix (e.g. `f"{gcs_bucket}/{request.node.name}"`).
    """
    with running_gcs_emulator(GCS_TEST_BUCKET):
        yield f"gs://{GCS_TEST_BUCKET}"
