"""One process at a time per run on `gs://`, which has no locks: a lease.

The lease is the object `.lock_<tag>_p<process>` (as a local lock's file is
named, `run_lock`), holding its process's pid, host, boot, pid namespace
and a token. It is created only where none is, renewed every `HEARTBEAT_S`
seconds while its process runs, and removed when the process releases it.
Each write and removal is conditioned on the generation its writer last
saw (`gcs_generations`), so of two processes acting on the same lease one
wins and the other learns it lost: a taker never removes a lease it did
not see, and a holder's renewal never writes over another's lease.

A process that ends without releasing it (kill -9, a lost machine) leaves
a lease that another process takes over once `LEASE_S` seconds have passed
since its last renewal (by Cloud Storage's clock, so the machines' clocks
do not matter), or at once where it was this machine's (this boot's, this
pid namespace's) and its process is gone: a resume on the same machine.
The refusal says how long is left, and which object to delete instead.

A holder stops at its next commit (`check_held`) once a renewal found the
lease another's, or once none got through for `LEASE_S - HEARTBEAT_S`
seconds (before another process may take it over), keeping what it
committed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid
import warnings

from gsm8k_jax import gcs_generations

# How often a lease is renewed, and how long after its last renewal another
# process takes it over (four missed renewals: a slow write or two do not
# end it).
HEARTBEAT_S = 30.0
LEASE_S = 4 * HEARTBEAT_S
# How long a release waits for a renewal in flight, and for the removal.
RELEASE_TIMEOUT_S = 10.0
# Takeovers tried before giving up (each loses only to another process
# acting on the same lease at the same moment).
_ATTEMPTS = 3


class LeaseError(RuntimeError):
    """Another process holds, or took over, the run's lease."""


@dataclasses.dataclass
class _Lease:
    """A lease this process holds, and its renewals."""

    data: bytes  # its contents, token included
    generation: int  # the last one this process wrote
    # Until when (time.monotonic) this process surely holds it: LEASE_S -
    # HEARTBEAT_S after the last write that got through was sent, so that a
    # holder whose renewals fail stops before another may take over.
    valid_until: float
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    renewals: threading.Thread | None = None
    lost: str | None = None  # why this process no longer holds it


_HELD: dict[str, _Lease] = {}


def take(path: str, run: str) -> bool:
    """Takes the lease at `path` for this process (`run` names the run in a
    refusal); False where this process holds it already.

    Raises:
      LeaseError: another live process holds it.
    """
    if path in _HELD:
        if not _HELD[path].lost and time.monotonic() < _HELD[path].valid_until:
            return False
        _stop(_HELD.pop(path))  # Lost since: taken afresh, or refused.
    identity = {**_this_process(), "token": uuid.uuid4().hex}
    data = json.dumps(identity).encode()
    for _ in range(_ATTEMPTS):
        sent = time.monotonic()
        generation = gcs_generations.write_if(path, data, 0)
        if generation is not None:
            break
        seen = gcs_generations.read(path)
        if seen is None:
            continue  # Released between our attempt and our look.
        contents, seen_generation, age_s = seen
        holder = _holder(contents)
        if not _lapsed(holder, age_s):
            raise LeaseError(
                f"{run} ({_name(holder)}, last heard from {max(age_s, 0):.0f} s"
                f" ago): wait for it to finish or stop it (a rerun then resumes"
                " it), or use another --output_dir. If it is gone (its machine"
                f" lost), its lease lapses in {max(LEASE_S - age_s, 0):.0f} s,"
                f" or delete {path}."
            )
        gcs_generations.remove_if(path, seen_generation)  # Lost: look again.
    else:
        raise LeaseError(
            f"{run}: another process took {path} at each of {_ATTEMPTS} attempts;"
            " is a second copy of this command starting?"
        )
    lease = _Lease(data, generation, _valid_until(sent))
    lease.renewals = threading.Thread(
        target=_renew_until_stopped, args=(path, lease), name="run lease", daemon=True
    )
    lease.renewals.start()
    _HELD[path] = lease
    return True


def check_held(path: str) -> None:
    """Raises LeaseError where this process took the lease at `path` and has
    lost it since (another process took it over, or no renewal got through
    for LEASE_S - HEARTBEAT_S seconds): its results must stop."""
    lease = _HELD.get(path)
    if lease is None:
        return
    if not lease.lost and time.monotonic() > lease.valid_until:
        lease.lost = f"no renewal got through for {LEASE_S - HEARTBEAT_S:.0f} s"
    if lease.lost:
        raise LeaseError(
            f"This process no longer holds {path}: {lease.lost}. It stops here;"
            " its committed results are kept."
        )


def release(path: str) -> None:
    """Stops renewing the lease at `path` and removes it, if this process
    holds it; waits at most about 2 x RELEASE_TIMEOUT_S, and only warns where
    it cannot remove it (the lease then lapses)."""
    lease = _HELD.pop(path, None)
    if lease is None:
        return
    _stop(lease)
    if lease.lost:
        return
    outcome: list[BaseException | None] = []

    def remove() -> None:
        try:
            if not gcs_generations.remove_if(path, lease.generation):
                # A renewal still in flight may have written it since.
                seen = gcs_generations.read(path)
                if seen is not None and seen[0] == lease.data:
                    gcs_generations.remove_if(path, seen[1])
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 Reported below, in a warning.
            outcome.append(e)

    removal = threading.Thread(target=remove, daemon=True)
    removal.start()
    removal.join(RELEASE_TIMEOUT_S)
    if outcome != [None]:
        reason = outcome[0] if outcome else f"no answer in {RELEASE_TIMEOUT_S:.0f} s"
        warnings.warn(
            f"Could not remove the lease {path} ({reason}): a rerun on another"
            f" machine waits until it lapses ({LEASE_S:.0f} s).",
            stacklevel=2,
        )


def _stop(lease: _Lease) -> None:
    """Stops the lease's renewals, waiting at most RELEASE_TIMEOUT_S for one
    in flight."""
    lease.stop.set()
    lease.renewals.join(RELEASE_TIMEOUT_S)


def _valid_until(sent: float) -> float:
    return sent + LEASE_S - HEARTBEAT_S


def _renew_until_stopped(path: str, lease: _Lease) -> None:
    """Renews the lease every HEARTBEAT_S seconds until stopped, or lost to
    another process. A renewal that fails (network, credentials) is tried
    again; `check_held` stops the run once none got through for long."""
    while not lease.stop.wait(HEARTBEAT_S):
        try:
            _renew(path, lease)
        except Exception:  # noqa: BLE001, S112 Tried again at the next beat.
            continue
        if lease.lost:
            return


def _renew(path: str, lease: _Lease) -> None:
    sent = time.monotonic()
    generation = gcs_generations.write_if(path, lease.data, lease.generation)
    if generation is None:
        seen = gcs_generations.read(path)
        if seen is None or seen[0] != lease.data:
            lease.lost = "another process took it over"
            return
        generation = seen[1]  # Our own write, retried by gcsfs after a hiccup.
    lease.generation = generation
    lease.valid_until = _valid_until(sent)


def _this_process() -> dict:
    """Who holds a lease: the pid, and where it means something (host, boot
    and pid namespace: containers on one machine share its boot, and with
    host networking its host name)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid_namespace": _pid_namespace(),
    }


def _boot_id() -> str | None:
    """This machine's boot (Linux): a host name outlives a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _holder(contents: bytes) -> dict:
    try:
        holder = json.loads(contents)
    except ValueError:
        return {}  # Damaged: only its age can end it.
    return holder if isinstance(holder, dict) else {}


def _name(holder: dict) -> str:
    return f"process {holder.get('pid')} on {holder.get('host')}"


def _lapsed(holder: dict, age_s: float) -> bool:
    """Whether a lease no longer holds: not renewed for LEASE_S seconds, or
    this machine's (this boot's, this pid namespace's) and its process gone,
    or this very process's (left by a release that could not remove it)."""
    if age_s > LEASE_S:
        return True
    here = _this_process()
    if any(holder.get(k) != here[k] for k in ("host", "boot", "pid_namespace")):
        return False
    pid = holder.get("pid")
    return pid == here["pid"] or (isinstance(pid, int) and not _running(pid))


def _running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Another user's.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
