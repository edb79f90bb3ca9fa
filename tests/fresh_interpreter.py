"""Code run in a fresh Python interpreter, for what only a new process
shows: which modules an import brings in, or what a process finds on disk
that an earlier one left."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Mapping


def last_value(code: str, env: Mapping[str, str] | None = None):
    """The Python literal `code` prints last, run in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def imported_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh interpreter has imported after `code`."""
    return last_value(
        f"import sys\n{code}\nprint(sorted(m for m in {modules!r} if m in sys.modules))"
    )
