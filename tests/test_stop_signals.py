"""Ctrl-C and SIGTERM: deferred past a commit, never lost, and gone with the
run that received them."""

import signal
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from gsm8k_jax.eval import multihost, runner, sweep
from gsm8k_jax.stop_signals import Terminated, finishing_write, stop_on_signals

STOP_SIGNALS = [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)]
STOP_IDS = ["ctrl-c", "sigterm"]


@pytest.fixture
def terminal_ctrl_c():
    """Ctrl-C handled as at a terminal, whether or not pytest was started
    ignoring it; the handlers before the test are back after it."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum, exception", STOP_SIGNALS, ids=STOP_IDS)
def test_a_signal_during_a_commit_stops_after_it(terminal_ctrl_c, signum, exception):
    finished = []
    with pytest.raises(exception), stop_on_signals(), finishing_write():
        signal.raise_signal(signum)
        finished.append("commit")
    assert finished == ["commit"]


@pytest.mark.parametrize("signum, exception", STOP_SIGNALS, ids=STOP_IDS)
def test_a_signal_during_another_threads_commit_waits_for_it(
    terminal_ctrl_c, signum, exception
):
    """A sweep commits from worker threads: the main thread's stop waits
    until their commits are written, then the committing thread raises."""
    inside, release = threading.Event(), threading.Event()
    raised = []

    def commit():
        try:
            with finishing_write():
                inside.set()
                release.wait()
        except BaseException as e:
            raised.append(type(e))

    with stop_on_signals():
        worker = threading.Thread(target=commit)
        worker.start()
        inside.wait()
        signal.raise_signal(signum)  # Recorded; the commit is in progress.
        release.set()
        worker.join()
        assert raised == [exception]
        with pytest.raises(exception), finishing_write():
            pass  # The main thread's next commit does not start.


def exceptions_dropped(monkeypatch) -> list:
    """What Python would print as "Exception ignored in ..." from now on."""
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)
    return dropped


def raise_in_a_finalizer(signum: int) -> None:
    """Raises `signum` in `__del__`, where Python drops its exception."""

    class Finalized:
        def __del__(self):
            signal.raise_signal(signum)

    Finalized()  # Collected at once.


def test_a_ctrl_c_lost_in_a_finalizer_stops_the_next_commit(
    terminal_ctrl_c, monkeypatch
):
    """Python drops a KeyboardInterrupt raised in `__del__`; the run must
    still stop, before its next commit writes anything."""
    dropped = exceptions_dropped(monkeypatch)
    written = []
    with stop_on_signals():
        raise_in_a_finalizer(signal.SIGINT)
        assert [d.exc_type for d in dropped] == [KeyboardInterrupt]
        with pytest.raises(KeyboardInterrupt), finishing_write():
            written.append("commit")
    assert written == []


@pytest.mark.parametrize("signum, exception", STOP_SIGNALS, ids=STOP_IDS)
def test_a_run_stopped_leaves_the_next_one_running(terminal_ctrl_c, signum, exception):
    """In one process (a notebook, a test), a stop ends its own run only:
    the next one commits, and the handlers before the first are back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(exception), stop_on_signals(), finishing_write():
        signal.raise_signal(signum)
    assert {s: signal.getsignal(s) for s in before} == before
    written = []
    with stop_on_signals(), finishing_write():
        written.append("commit")
    assert written == ["commit"]


def test_a_ctrl_c_ignored_from_the_start_stays_ignored(terminal_ctrl_c):
    """A background job of a script is started ignoring Ctrl-C; SIGTERM
    still stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with stop_on_signals():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)


def test_a_signal_while_the_handlers_are_put_back_is_raised_after(
    terminal_ctrl_c, monkeypatch
):
    """A signal that lands while the handlers are restored (Python may run a
    handler inside signal.signal) neither cuts the restoring short nor is
    lost: it is raised once the handlers before the run are back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    set_handler = signal.signal
    landed = []

    def signal_lands_during(signum, handler):
        if not landed:
            landed.append(signum)
            signal.raise_signal(signal.SIGTERM)  # Handled by the run's handler.
        return set_handler(signum, handler)

    with pytest.raises(Terminated), stop_on_signals():
        monkeypatch.setattr(signal, "signal", signal_lands_during)
    monkeypatch.undo()
    assert landed
    assert {s: signal.getsignal(s) for s in before} == before


def test_the_last_write_while_stopping_is_not_cut_short(terminal_ctrl_c):
    """The trainer saves the steps it trained once a stop signal arrived: a
    second Ctrl-C during that save must not cut it short, and the first
    signal is raised again by the handler, not by the save."""
    saved = []
    with pytest.raises(KeyboardInterrupt), stop_on_signals():
        try:
            signal.raise_signal(signal.SIGTERM)
        except Terminated:
            with finishing_write(while_stopping=True):
                signal.raise_signal(signal.SIGINT)
                saved.append("step")
            raise KeyboardInterrupt from None
    assert saved == ["step"]


class _NobodyElseArrives:
    """A coordination service client (and jax.distributed's state) where
    process 0 of 2 waits for a process that never comes."""

    process_id, num_processes = 0, 2

    @property
    def client(self):
        return self

    def key_value_set(self, key, value):
        pass

    def key_value_dir_get(self, prefix):
        return []


class _NothingCommitted:
    """RunFiles whose other processes never commit a rollout."""

    output_dir = "nowhere"

    def read_finished(self, num_samples):
        return []


@pytest.mark.parametrize("signum, exception", STOP_SIGNALS, ids=STOP_IDS)
@pytest.mark.parametrize("loop", ["barrier", "merge", "sweep"])
def test_a_signal_lost_in_a_finalizer_stops_a_loop_that_waits(
    terminal_ctrl_c, monkeypatch, signum, exception, loop
):
    """A loop waiting for the other processes (the barrier before
    generation, process 0's wait for their results, or for their runs of a
    sweep) commits nothing: it must still stop on a signal whose exception
    Python dropped, not at its timeout."""
    dropped = exceptions_dropped(monkeypatch)
    monkeypatch.setattr(multihost, "_state", _NobodyElseArrives)
    waits = {
        "barrier": lambda: multihost.wait_for_all_processes("start", timeout_s=5),
        "merge": lambda: runner._wait_for_all(
            _NothingCommitted(), [SimpleNamespace(id="q1")], 1, timeout_s=5, poll_s=0.01
        ),
        "sweep": lambda: sweep._wait_for_summary(
            SimpleNamespace(summary_path="/no/such/summary.json", tag="run"),
            time.monotonic() + 5,
            "nowhere",
            poll_s=0.01,
        ),
    }
    with stop_on_signals():
        raise_in_a_finalizer(signum)
        assert [d.exc_type for d in dropped] == [exception]
        started = time.monotonic()
        with pytest.raises(exception):
            waits[loop]()
    assert time.monotonic() - started < 1
