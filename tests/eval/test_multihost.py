"""Multi-host evaluation: two jax.distributed processes (each with two CPU
devices and a data-parallel mesh) write the files one process writes (the
rollouts byte for byte, in the default dtype), to a local folder or to
gs://, and resume after both are killed with -9."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from eval.test_eval_scripts import (
    BASE_SCRIPT,
    REPO,
    TIMING_KEYS,
    committed,
    read_outputs,
    run_script,
)
from gcs_emulator import gcs_filesystem

ARGS = ["--num_examples=10", "--batch_size=2", "--max_generation_steps=12"]
TAG = "gemma3-tiny_base_bs2"
IGNORED = TIMING_KEYS | {"devices"}
# Longer than the tests wait for anything.
HELD_PROCESS_TIMEOUT_S = 1800


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_device_env() -> dict[str, str]:
    """This environment, with two CPU devices per process."""
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")


def start_two_processes(
    out_dir,
    heartbeat_timeout_s=HELD_PROCESS_TIMEOUT_S,
    args=tuple(ARGS),
    piped=(),
    args_of=None,
):
    """The two processes of one run of `args` (and `args_of[i]` for process
    i) into `out_dir`, each with its stdout in a temporary file, or a pipe
    for the indices in `piped`: [(process, stdout file or None)]."""
    address = f"127.0.0.1:{free_port()}"
    started = []
    for i in range(2):
        if i in piped:
            stdout = subprocess.PIPE
        else:  # Read while it runs: no context manager.
            stdout = tempfile.TemporaryFile("w+")  # noqa: SIM115
        command = [sys.executable, str(BASE_SCRIPT), *args, f"--output_dir={out_dir}"]
        command += (args_of or {}).get(i, [])
        command += ["--distributed", f"--coordinator_address={address}"]
        command += ["--num_processes=2", f"--process_id={i}"]
        # Held with SIGSTOP, a process sends no heartbeat: without a long
        # timeout the other aborts if its share takes over jax's default
        # 100 s (a loaded machine).
        command += [f"--heartbeat_timeout_s={heartbeat_timeout_s}"]
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=two_device_env(),
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append((proc, None if i in piped else stdout))
    return started


def output(stdout) -> str:
    stdout.seek(0)
    return stdout.read()


def run_two_processes(out_dir) -> list[str]:
    """Runs both processes to the end; returns their stdout."""
    started = start_two_processes(out_dir)
    outputs = []
    for proc, stdout in started:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(output(stdout))
    return outputs


def wait_until(condition, what, timeout_s=300, processes=()):
    """Polls `condition` until it holds; fails, saying how each of
    `processes` stands, on a timeout or when one of them exits first."""
    deadline = time.time() + timeout_s
    while not condition():
        exited = [p for p in processes if p.poll() is not None]
        if exited or time.time() >= deadline:
            states = [
                f"process {i}: "
                + ("running" if p.poll() is None else f"exit {p.returncode}")
                for i, p in enumerate(processes)
            ]
            for p in exited:
                states.append(f"stderr ends {p.stderr.read()[-1500:]!r}")
            raise AssertionError(f"waiting for {what}: {'; '.join(states)}")
        time.sleep(0.02)


def stop_at_line(proc, prefix, processes, signum=signal.SIGSTOP):
    """Holds `proc` (SIGSTOP, or sends it `signum`; its stdout a pipe) the
    moment it prints a line starting with `prefix`, from a thread that then
    reads its stdout to the end; fails as `wait_until` does. Returns that
    thread."""
    stopped = threading.Event()

    def read():
        for line in proc.stdout:
            if not stopped.is_set() and line.startswith(prefix):
                proc.send_signal(signum)
                stopped.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(stopped.is_set, f"a line starting {prefix!r}", processes=processes)
    return reader


class PipedRun:
    """Both processes of a run into `out_dir`, process 1's stdout a pipe
    (for `signal_at_line`); on leaving the context both are killed, and
    their output closed."""

    def __init__(self, out_dir):
        (proc0, self.out0), (proc1, _) = start_two_processes(out_dir, piped=(1,))
        self.procs = (proc0, proc1)
        self.reader = None

    def signal_at_line(self, prefix, signum):
        """Sends process 1 `signum` the moment it prints a line starting
        with `prefix` (see `stop_at_line`)."""
        self.reader = stop_at_line(self.procs[1], prefix, self.procs, signum)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        proc0, proc1 = self.procs
        for proc in self.procs:
            proc.kill()
        proc0.communicate()
        proc1.wait()
        if self.reader is not None:
            self.reader.join()  # It ends with the killed process's output.
        proc1.stderr.close()
        self.out0.close()


BARRIER_PROGRAM = """
import os, signal, sys
import jax
from gsm8k_jax.eval.multihost import wait_for_all_processes
process_id, address = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(address, num_processes=2, process_id=process_id)
jax.devices()  # The backend, started before the barrier as the model's load starts it.
wait_for_all_processes("test barrier", timeout_s=600)
if process_id == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
# A computation on every local device, as generation's first is.
local = jax.sharding.Mesh(jax.local_devices(), ("data",))
sharding = jax.sharding.NamedSharding(local, jax.sharding.PartitionSpec("data"))
jax.block_until_ready(jax.device_put(jax.numpy.arange(2), sharding) + 1)
# Done: exit without jax.distributed's shutdown barrier, which waits for the
# held process.
os._exit(0)
"""


def test_a_process_held_just_past_the_barrier_holds_no_other():
    """The barrier before generation: process 1 stops itself (SIGSTOP) the
    moment it is past; process 0 must get past and compute. After a device
    collective (`sync_global_devices`) it could wait for ever: that returns
    once one local device has the result, and the next computation waits
    for the others, which can still be waiting for the held process. (The
    old barrier hung in 2 of 3 runs of this test once and in none of 3
    later: it catches that hang some of the time, and never fails wrongly.)"""
    run_program(BARRIER_PROGRAM)


def run_program(program: str) -> str:
    """`program` as processes 0 and 1 of a jax.distributed run (argv: the
    process id, the coordinator's address), two CPU devices each, until
    process 0 exits (with status 0); returns its stdout. Process 1 is killed."""
    address = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", program, str(i), address],
            cwd=REPO,
            env=two_device_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        out, err = procs[0].communicate(timeout=120)
        assert procs[0].returncode == 0, err[-3000:]
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    return out


LATE_PROCESS_PROGRAM = """
import os, sys, time
import jax
from gsm8k_jax.eval.multihost import wait_for_all_processes
process_id, address = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(address, num_processes=2, process_id=process_id)
if process_id == 1:
    time.sleep(600)  # Still loading.
try:
    wait_for_all_processes("the start of generation", timeout_s=2)
except RuntimeError as e:
    print(e)
os._exit(0)  # Without jax.distributed's shutdown barrier.
"""


def test_a_process_that_never_arrives_is_named_at_the_barrier_timeout():
    out = run_program(LATE_PROCESS_PROGRAM)
    assert out.startswith(
        "Process(es) [1] did not reach 'the start of generation' within"
        " --barrier_timeout_s=2 s"
    ), out


BLOCKED_PROCESS_PROGRAM = """
import os, sys, threading
from gsm8k_jax.eval import multihost
from gsm8k_jax.stop_signals import Terminated, stop_on_signals
process_id, address = int(sys.argv[1]), sys.argv[2]
with stop_on_signals():
    multihost.initialize(address, 2, process_id)
    if process_id == 1:
        multihost.post_stop("error: x")
        threading.Event().wait()
    # Blocked as a sweep's main thread is, joining its device groups' threads.
    worker = threading.Thread(target=threading.Event().wait, daemon=True)
    worker.start()
    try:
        worker.join()
    except Terminated:
        print(multihost.stop_heard())
os._exit(0)
"""


def test_a_stop_report_reaches_a_main_thread_blocked_in_a_join():
    """The watcher's interrupt alone waits for the main thread to run Python
    code again, which a join of a thread that never ends never does; the
    wake-up signal beside it ends the join."""
    assert run_program(BLOCKED_PROCESS_PROGRAM) == "(1, 'error: x')\n"


def test_an_error_on_one_process_stops_the_other_at_once(tmp_path):
    """Process 1 fails before the barrier that starts generation (its
    --data_path is missing): process 0 stops too, naming process 1's error,
    instead of waiting for it at the barrier for --barrier_timeout_s (an
    hour) while process 1 waits for process 0 at exit (jax.distributed's
    shutdown)."""
    missing = tmp_path / "missing.jsonl"
    started = start_two_processes(
        tmp_path / "out", args_of={1: [f"--data_path={missing}"]}
    )
    errors = []
    try:
        for proc, _ in started:
            _, err = proc.communicate(timeout=300)
            errors.append(err.strip().splitlines()[-1])
    finally:
        for proc, stdout in started:
            proc.kill()
            proc.communicate()
            stdout.close()
    assert [proc.returncode for proc, _ in started] == [1, 1], errors
    assert errors[1].startswith(f"error: GSM8K data file not found: {missing}.")
    # No promise that a rerun resumes: it would meet the same error.
    assert errors[0] == (
        f"error: process 1 stopped ({errors[1]}); this one stopped too:"
        " finished results are kept."
    )


def test_sigterm_on_one_process_stops_both_and_a_rerun_resumes(
    tmp_path, two_process_run
):
    """SIGTERM (a preemption notice) to process 1 once it reaches generation:
    it stops as a single process does (exit 0), and tells process 0, which
    stops as if it had the signal too (jax.distributed's preemption service
    would have taken the signal, and process 1 gone on); rerun, they write
    the uninterrupted run's files."""
    with PipedRun(tmp_path) as run:
        proc0, proc1 = run.procs
        run.signal_at_line("Results: ", signal.SIGTERM)
        _, err0 = proc0.communicate(timeout=300)
        err1 = proc1.stderr.read()
        proc1.wait(timeout=300)
    stopped = "finished results are kept; rerun the same command to resume."
    # Both exit as a preempted process does.
    assert (proc0.returncode, proc1.returncode) == (0, 0), err0[-3000:]
    assert err1.strip().splitlines()[-1] == f"Stopped by SIGTERM: {stopped}"
    assert err0.strip().splitlines()[-1] == (
        f"Stopped by SIGTERM on process 1: {stopped}"
    )
    assert not (tmp_path / f"rollouts_{TAG}.jsonl").exists()

    run_two_processes(tmp_path)
    (expected_rollouts, expected_summary), _ = two_process_run
    rollouts, summary = read_outputs(tmp_path, TAG)
    assert rollouts == expected_rollouts
    ignored = IGNORED | {"resumed_examples"}
    assert {k: v for k, v in summary.items() if k not in ignored} == {
        k: v for k, v in expected_summary.items() if k not in ignored
    }


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The files and stdout of an uninterrupted two-process run, local."""
    out = tmp_path_factory.mktemp("multi")
    stdout = run_two_processes(out)
    return read_outputs(out, TAG), stdout


def test_two_processes_merge_into_the_single_process_files(tmp_path, two_process_run):
    run_script(*ARGS, f"--output_dir={tmp_path / 'single'}")
    expected_rollouts, expected_summary = read_outputs(tmp_path / "single", TAG)
    (rollouts, summary), stdout = two_process_run
    assert (
        "Process 1: its share is committed; process 0 writes the results."
        in (stdout[1])
    )
    # In the default dtype, bfloat16: the one-process rollouts, byte for byte.
    assert [json.loads(line)["id"] for line in rollouts.splitlines()] == list(range(10))
    assert rollouts == expected_rollouts
    assert summary["num_shards"] == 2
    ignored = IGNORED | {"num_shards"}
    assert {k: v for k, v in summary.items() if k not in ignored} == {
        k: v for k, v in expected_summary.items() if k not in ignored
    }


def test_two_processes_on_gcs_killed_and_resumed(gcs_bucket, two_process_run):
    """Process 1 is held (SIGSTOP) the moment it is past the barrier that
    starts generation, so the kill -9 of both lands when only process 0's
    share is committed; the rerun writes the uninterrupted run's files, byte
    for byte. (Held there, process 1 once left process 0 waiting inside the
    barrier's device collective.)"""
    out = f"{gcs_bucket}/multihost"
    with PipedRun(out) as run:
        run.signal_at_line("Results: ", signal.SIGSTOP)
        share = lambda: committed(out, TAG) >= 5
        wait_until(share, "process 0's share", processes=run.procs)
    assert committed(out, TAG) == 5

    run_two_processes(out)
    (expected_rollouts, expected_summary), _ = two_process_run
    fs = gcs_filesystem()
    assert fs.cat_file(f"{out}/rollouts_{TAG}.jsonl").decode() == expected_rollouts
    summary = json.loads(fs.cat_file(f"{out}/summary_{TAG}.json"))
    assert summary["resumed_examples"] == 5
    assert {k: v for k, v in summary.items() if k not in IGNORED} == {
        k: v for k, v in expected_summary.items() if k not in IGNORED
    }
    assert not fs.exists(f"{out}/chunks_{TAG}")


def test_a_silent_process_makes_the_others_abort_and_chunks_stay(tmp_path):
    """Process 1 held (SIGSTOP) sends no heartbeat: after
    --heartbeat_timeout_s process 0 aborts instead of waiting for its share
    for ever, and what was committed stays for --resume."""
    timeout_s = 10
    # Shares of 32 problems of 64 tokens, decoded two at a time (one tile of
    # two slots): far from done at the first commit. (At the default CPU
    # tile of 32 slots a share is committed whole, and a process stopped
    # after its first commit may have written all it had to.)
    args = [
        "--num_examples=64",
        "--batch_size=2",
        "--row_tile=2",
        "--max_generation_steps=64",
    ]
    (p0, out0), (p1, out1) = start_two_processes(tmp_path, timeout_s, args)
    try:
        wait_until(
            lambda: committed(tmp_path, TAG) > 0, "a first commit", processes=(p0, p1)
        )
        p1.send_signal(signal.SIGSTOP)
        held = committed(tmp_path, TAG)
        _, err = p0.communicate(timeout=30 * timeout_s)
        assert p0.returncode != 0, err[-3000:]
        assert held <= committed(tmp_path, TAG) < 64, (held, err[-3000:])
        assert not (tmp_path / f"rollouts_{TAG}.jsonl").exists()
    finally:
        for p in (p0, p1):
            p.kill()
            p.communicate()
        for out in (out0, out1):
            out.close()
