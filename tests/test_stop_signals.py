"""Ctrl-C and SIGTERM: deferred past a commit, and never lost."""

import signal
import sys

import pytest

from gsm8k_jax import stop_signals
from gsm8k_jax.stop_signals import Terminated, finishing_write, stop_on_signals


@pytest.fixture
def handlers():
    """The stop handlers installed for one test, then the previous ones."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # As at a terminal, whether or not pytest was started ignoring Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop_on_signals()
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    stop_signals._received = None


@pytest.mark.parametrize(
    "signum, exception",
    [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_during_a_commit_stops_after_it(handlers, signum, exception):
    finished = []
    with pytest.raises(exception):
        with finishing_write():
            signal.raise_signal(signum)
            finished.append("commit")
    assert finished == ["commit"]


def test_a_ctrl_c_lost_in_a_finalizer_stops_the_next_commit(handlers, monkeypatch):
    """Python drops a KeyboardInterrupt raised in `__del__`; the run must
    still stop, before its next commit writes anything."""

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    dropped = []  # What Python would print as "Exception ignored in ...".
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)
    Finalized()  # Collected at once: its KeyboardInterrupt is dropped.
    assert [d.exc_type for d in dropped] == [KeyboardInterrupt]
    written = []
    with pytest.raises(KeyboardInterrupt):
        with finishing_write():
            written.append("commit")
    assert written == []


def test_no_signal_no_stop(handlers):
    with finishing_write():
        pass
    assert stop_signals._received is None
