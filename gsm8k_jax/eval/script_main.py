"""How every script in research/script runs its main: the project's flags
in --help, quiet logging, `gs://` storage checked first, and a user error,
Ctrl-C or SIGTERM reported in one line (in a multi-host run, also to the
other processes, which stop too)."""

from __future__ import annotations

import atexit
import gc
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from absl import app
from tqdm import tqdm

from gsm8k_jax.eval import cli_flags, multihost
from gsm8k_jax.eval.results import ResultsWarning
from gsm8k_jax.quiet import quiet_logging
from gsm8k_jax.stop_signals import Terminated, stop_on_signals
from gsm8k_jax.storage import require_reachable

# Input and environment problems (ValueError: CheckpointError too;
# RuntimeError: SourceError, ResultsError, StorageError; OSError: missing or
# unreadable files) are reported as one line, not a traceback.
USER_ERRORS = (ValueError, RuntimeError, OSError)
# How shells report a command stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT_STATUS = 130
# Each stop signal, by the reason a process posts for it to the others: how
# its line begins, and its exit status (the same on every process it stops).
_SIGNAL_STOPS = {
    "Ctrl-C": ("Interrupted", INTERRUPTED_EXIT_STATUS),
    "SIGTERM": ("Stopped by SIGTERM", 0),
}


def _report(message: str) -> None:
    """Prints `message` to stderr on a line of its own, also when a progress
    bar was left open by the failure."""
    tqdm.write(message, file=sys.stderr)


def _one_line_warnings() -> None:
    """Shows a `ResultsWarning` (results read with a damaged part left out)
    as one `warning: ...` line; other warnings as Python shows them."""
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ResultsWarning):
            _report(f"warning: {message}")
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def _stop(message: str, exit_status: int, reason: str | None = None) -> NoReturn:
    """Reports `message`, tells the other processes of a multi-host run that
    this one stops and why (`reason`, else `message`), and exits."""
    _report(message)
    multihost.post_stop(reason or message)
    sys.exit(exit_status)


def _stop_on_signal(reason: str, survives: str) -> NoReturn:
    """Stops as the stop signal `reason` (a `_SIGNAL_STOPS` key) stops a process."""
    line, exit_status = _SIGNAL_STOPS[reason]
    _stop(f"{line}: {survives}.", exit_status, reason)


def _stop_as_heard(process: int, reason: str, survives: str, kept: str) -> NoReturn:
    """Stops as process `process` did: on a stop signal, as that signal
    stops a process (the same exit status: a preempted slice reads as
    preempted on every host); on an error, with status 1, and no promise that
    a rerun resumes (it would meet the same error)."""
    if reason in _SIGNAL_STOPS:
        line, exit_status = _SIGNAL_STOPS[reason]
        _stop(f"{line} on process {process}: {survives}.", exit_status)
    _stop(
        f"error: process {process} stopped ({reason}); this one stopped too: {kept}.", 1
    )


def _what_survives(stop: BaseException, kept: str) -> str:
    """The account a stop exception carries, else `kept` and how to resume."""
    return str(stop) or f"{kept}; rerun the same command to resume"


def run_main(
    main_fn: Callable[[list[str]], Any], *, kept: str = "finished results are kept"
) -> None:
    """Runs `main_fn` under absl, after checking that any `gs://` flag's storage
    is reachable. A user error is one line (exit status 1); so is Ctrl-C, which
    says that rerunning resumes (`kept`: what survives the interruption), and
    so is SIGTERM (a preemption notice), which stops the work the same way
    and exits 0. `main_fn` may raise the stop signal's exception again with
    its own account of what survives, e.g. `KeyboardInterrupt("saved step
    4")`, which then replaces that sentence. In a multi-host run, a process
    that stops so tells the others, which stop too (`multihost`)."""
    cli_flags.list_in_help()
    # At exit, spare the interpreter's last collection over every object
    # jax, flax and transformers made (about 0.5 s of each exit on CPU);
    # a caller that catches the SystemExit keeps collecting as before.
    atexit.register(gc.freeze)

    def _main(argv):
        quiet_logging()
        _one_line_warnings()
        if len(argv) > 1:  # Else ignored: e.g. an output folder without its flag.
            _report(
                f"error: unexpected argument(s) {' '.join(argv[1:])}: every setting"
                " is a --flag=value (see --help)."
            )
            sys.exit(1)
        cli_flags.expand_home()
        try:
            with stop_on_signals():
                for path in cli_flags.gcs_flag_values():
                    require_reachable(path)
                main_fn(argv)
        except USER_ERRORS as e:
            _stop(f"error: {e}", 1)
        except KeyboardInterrupt as stop:
            _stop_on_signal("Ctrl-C", _what_survives(stop, kept))
        except Terminated as stop:
            survives = _what_survives(stop, kept)
            if heard := multihost.stop_heard():
                _stop_as_heard(*heard, survives, kept)
            _stop_on_signal("SIGTERM", survives)
        except Exception as e:  # A bug: its traceback follows.
            multihost.post_stop(f"{type(e).__name__}: {e}")
            raise

    app.run(_main, flags_parser=cli_flags.parse_flags)


def run_eval_script(*, lora: bool, default_model_config: str | Path) -> None:
    """Entry point of eval_gsm8k.py (lora=True) and eval_gsm8k_base.py: the
    evaluation flags, then `cli.main`, imported only once they parse (it
    brings in jax and transformers, a few seconds that --help and a
    mistyped flag need not wait for)."""
    cli_flags.define_flags(default_model_config)

    def main(argv: list[str]) -> dict[str, Any] | None:
        from gsm8k_jax.eval import cli

        return cli.main(argv, lora=lora)

    run_main(main)
