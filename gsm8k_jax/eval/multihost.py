"""The processes of a multi-host run: they start together, and stop together.

jax.distributed alone turns one process's error into a long hang: the
process that stopped waits at exit for the others (jax.distributed's
shutdown barrier), while they wait for it at the barrier before generation
(an hour) or for its results (a day). Here a process that stops on an
error, Ctrl-C or SIGTERM posts its one-line report in the coordination
service's key-value store (`post_stop`); every other process watches for
such a report from a thread and, on seeing one, stops as SIGTERM would stop
it (what it finished stays committed), and says which process stopped and
why (`stop_heard`). A process that dies without a word (kill -9, a lost
host) is caught by jax.distributed's heartbeats instead.

jax is imported where it is used: the scripts read this module while
parsing flags and reporting errors, before any heavy import.
"""

from __future__ import annotations

import _thread
import atexit
import signal
import sys
import threading
import time

from gsm8k_jax import stop_signals

# jax.distributed.initialize's own default.
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
# How long processes wait for each other to load the model and data: loading
# a large model from gs:// can take tens of minutes, and not on every process
# alike.
DEFAULT_BARRIER_TIMEOUT_S = 3600
# How often a process looks for another's stop report, and for arrivals at a
# barrier.
WATCH_INTERVAL_S = 0.5
BARRIER_POLL_S = 0.05

# A signal whose (empty) handler only wakes the main thread from a blocking
# wait (a thread's join, a lock, a sleep), so the SIGTERM that
# `interrupt_main` raises there is not held until the wait ends.
WAKE_SIGNAL = signal.SIGUSR1

# Key-value directories of the coordination service: one key per process.
_STOPPED = "gsm8k_jax/stopped/"
_ARRIVED = "gsm8k_jax/arrived/"

# (process index, report) of the first stop report this process heard.
_heard: tuple[int, str] | None = None
_stop_watching = threading.Event()


def _state():
    """jax.distributed's state: the coordination service's client (None
    outside jax.distributed), this process's id and the process count, read
    without starting a backend (which waits for every process). jax has no
    public accessor for the client; Orbax reads it the same way."""
    from jax._src import distributed

    return distributed.global_state


def _client():
    """The coordination service's client; None in a process that has not
    imported jax (flag parsing, or an error before any work), where
    jax.distributed cannot have started."""
    if "jax" not in sys.modules:
        return None
    return _state().client


def _process_of(key: str) -> int:
    return int(key.rsplit("/", 1)[-1])


def initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> None:
    """`jax.distributed.initialize`, then a thread that watches for the other
    processes' stop reports (until this process exits), and an empty
    handler for WAKE_SIGNAL (SIGUSR1), which that thread sends. Without jax's
    preemption service, which would take SIGTERM from `stop_on_signals`."""
    import jax

    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    # Every process starts its backend now, together: a backend's start
    # waits for every other's (two minutes at most), which a process that
    # failed before starting its own would otherwise hold up.
    jax.devices()
    signal.signal(WAKE_SIGNAL, lambda signum, frame: None)
    watcher = threading.Thread(
        target=_watch, args=(_state().process_id,), daemon=True, name="stop-watch"
    )
    watcher.start()

    def stop_watching():  # Runs before jax's own exit handler shuts the client down.
        _stop_watching.set()
        watcher.join(timeout=WATCH_INTERVAL_S * 10)

    atexit.register(stop_watching)


def _watch(own: int) -> None:
    import jax

    global _heard
    while not _stop_watching.wait(WATCH_INTERVAL_S):
        client = _client()
        if client is None:  # Shut down: the run is over.
            return
        try:
            reports = client.key_value_dir_get(_STOPPED)
        except jax.errors.JaxRuntimeError:  # The service is gone.
            return
        others = sorted(
            (_process_of(k), v) for k, v in reports if _process_of(k) != own
        )
        if others:
            _heard = others[0]
            # Stops the main thread as SIGTERM does, under stop_on_signals: a
            # commit in progress is finished first.
            _thread.interrupt_main(signal.SIGTERM)
            signal.pthread_kill(threading.main_thread().ident, WAKE_SIGNAL)
            return


def post_stop(report: str) -> None:
    """Tells the other processes (if any) that this one stops, and why."""
    _stop_watching.set()  # Stopping already: nothing to hear any more.
    client = _client()
    if client is None or _heard is not None:  # Alone, or stopping on another's report.
        return
    import jax

    try:
        client.key_value_set(
            f"{_STOPPED}{_state().process_id}", report, allow_overwrite=True
        )
    except jax.errors.JaxRuntimeError:
        pass  # The service is gone: the heartbeats tell the others.


def stop_heard() -> tuple[int, str] | None:
    """(process, its reason) if another's stop report stopped this process."""
    return _heard


def wait_for_all_processes(name: str, timeout_s: float) -> None:
    """A barrier in the coordination service's key-value store, not a device
    collective (`sync_global_devices`): a process stopped or killed just
    after passing a collective can leave the others inside it for ever. It
    waits in Python, so a stop report heard meanwhile stops it."""
    state = _state()
    state.client.key_value_set(f"{_ARRIVED}{name}/{state.process_id}", "")
    deadline = time.monotonic() + timeout_s
    while True:
        arrived = state.client.key_value_dir_get(f"{_ARRIVED}{name}/")
        missing = sorted(
            set(range(state.num_processes)) - {_process_of(k) for k, _ in arrived}
        )
        if not missing:
            return
        stop_signals.raise_if_stopped()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Process(es) {missing} did not reach '{name}' within"
                f" --barrier_timeout_s={timeout_s:g} s: still loading, or hung (their"
                " output says which); raise --barrier_timeout_s for a slower load."
            )
        time.sleep(BARRIER_POLL_S)
