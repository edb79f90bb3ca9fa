"""Scripts print what a person reads; other libraries' logging stays at warnings,
each as `warning: <message>`.

Left at absl's default (INFO), a run's own lines (run tag, results path,
progress, accuracy) are buried: JAX reports probing for a TPU, Orbax logs
about a hundred lines per checkpoint save, absl logs the script's own
"Finished" line, transformers advises at import that PyTorch was not found
(this project runs on JAX), and gcsfs logs a traceback for each failed
retry (its failures reach the user as this project's one-line errors).

Naming absl's standard `--verbosity` flag (or `-v`) on the command line
restores standard logging: `--verbosity=0` shows INFO, `--verbosity=1` DEBUG.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from absl import flags
from absl import logging as absl_logging

_VERBOSITY_NAMES = ("verbosity", "v")
# Libraries whose errors this project reports itself, as one line each.
_REPORTED_HERE = ("gcsfs", "aiohttp", "google.auth")


def verbosity_given(argv: Sequence[str]) -> bool:
    """Whether `argv` names absl's --verbosity flag, in any of absl's spellings
    (`--verbosity=0`, `-v 1`, `--v=1`), before the flags are parsed."""
    for arg in argv[1:]:
        if arg == "--":
            break
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("-") and name in _VERBOSITY_NAMES:
            return True
    return False


def quiet_imports(argv: Sequence[str] | None = None) -> None:
    """Silences transformers' import-time advice unless `argv` (default:
    sys.argv) names --verbosity. Call it at the top of a script, before
    anything imports transformers."""
    if not verbosity_given(sys.argv if argv is None else argv):
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def quiet_logging() -> None:
    """Once the flags are parsed: unless --verbosity was given, logging shows
    warnings and errors only (absl's app.run raises an unset verbosity to
    INFO), and gcsfs's, aiohttp's and google.auth's (gcsfs's search for
    credentials) nothing."""
    if flags.FLAGS["verbosity"].present:
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.get_absl_handler().setFormatter(_Plain())
    for name in _REPORTED_HERE:
        logging.getLogger(name).setLevel(logging.CRITICAL)


class _Plain(logging.Formatter):
    """`warning: <message>`, as the scripts print their own warnings (absl's
    prefix of date, thread and source line is for developers); a logged
    exception's traceback still follows its line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"
