"""Code run in a fresh Python interpreter, for what only a new process
shows: which modules an import brings in, or what a process finds on disk
that an earlier one left."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Mapping


def printed_lines(code: str, env: Mapping[str, str] | None = None) -> list[str]:
    """What `code` prints, line by line, run in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return done.stdout.splitlines()


def last_value(code: str, env: Mapping[str, str] | None = None):
    """The Python literal `code` prints last, run in a fresh interpreter."""
    return ast.literal_eval(printed_lines(code, env)[-1])


def only_value(code: str, env: Mapping[str, str] | None = None):
    """The one Python literal `code` prints; it must print nothing else."""
    lines = printed_lines(code, env)
    assert len(lines) == 1, lines
    return ast.literal_eval(lines[0])


def imported_after(
    code: str, modules: tuple[str, ...], *, prints_nothing: bool = False
) -> list[str]:
    """Which of `modules` a fresh interpreter has imported after `code`
    (which, with `prints_nothing`, must print nothing of its own)."""
    check = (
        f"import sys\n{code}\nprint(sorted(m for m in {modules!r} if m in sys.modules))"
    )
    return (only_value if prints_nothing else last_value)(check)
