"""Ctrl-C for child processes that tests interrupt."""

import sys

# Runs the command after it with Ctrl-C at its default, as from a terminal:
# a test run started as a background job of a script ignores SIGINT, and a
# child inherits that (the default disposition survives exec, and Python
# then installs its KeyboardInterrupt handler). A wrapper rather than
# Popen's preexec_fn, which is unsafe while other threads run.
WITH_DEFAULT_CTRL_C = [
    sys.executable,
    "-c",
    (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL);"
        " os.execv(sys.argv[1], sys.argv[1:])"
    ),
]
