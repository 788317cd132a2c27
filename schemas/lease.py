"""One writer per store: a lease object, ``STORE/lease.json``, held while a job writes the store.

Works on any filesystem Beam knows, without conditional writes:
- **acquire**: read the lease; a live one of another owner refuses the job. Otherwise write our
  own, wait ``settle`` seconds, read it back: of two jobs that both found none, the later write
  wins and the earlier job sees it and refuses (a write lands well within the settle time).
- **alive** while its heartbeat (every ttl / 4) keeps pushing ``expires_at`` forward.
- **broken** by a successor once expired, or at once where the owner ran on the same host and
  that process is gone (kill -9, a crash): a rerun needs no manual step.
- **fenced**: the final commit calls ``check`` first, so a job that lost its lease (paused past
  expiry, taken over) cannot commit over its successor.
- **released** (deleted) when the job ends, however it ends.
Expiry compares wall clocks of different hosts: keep them within a fraction of the ttl.
"""
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from schemas import columns as C
from schemas import storage

log = logging.getLogger(__name__)
FORMAT = "edje-store-lease"
DEFAULT_TTL = 120.0
DEFAULT_SETTLE = 2.0
MAX_LEASE_BYTES = 64 << 10


class LeaseHeld(RuntimeError):
    """Another live job holds the store's lease."""


class LeaseLost(RuntimeError):
    """This job's lease expired or was taken over before it committed."""


def lease_path(store: str) -> str:
    return storage.join(store, C.LEASE)


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or _process_start(pid) in (None, start)


def read_lease(store: str) -> Optional[dict]:
    """The lease record, or None when there is none (an unreadable one counts as held: the
    writer may be replacing it; it expires like any other)."""
    path = lease_path(store)
    try:
        if not storage.exists(path):
            return None
        record = storage.read_json(path, MAX_LEASE_BYTES)
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable lease (%s)", path, e)
        return {"owner": "?", "expires_at": _now() + DEFAULT_TTL}
    return record if isinstance(record, dict) else {"owner": "?", "expires_at": _now() + DEFAULT_TTL}


def breakable(record: dict, now: Optional[float] = None) -> Optional[str]:
    """Why ``record`` may be taken over (expired, its process gone), or None while it is live."""
    now = _now() if now is None else now
    try:
        expires = float(record.get("expires_at", 0))
    except (TypeError, ValueError):
        expires = 0.0
    if now > expires:
        return f"expired at {_iso(expires)}"
    pid = record.get("pid")
    if record.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid():
        if not _process_alive(pid, record.get("process_start")):
            return f"its process {pid} on this host is gone"
    return None


def describe(record: dict) -> str:
    return (f"{record.get('job', '?')} (owner {record.get('owner', '?')}, pid {record.get('pid', '?')} on "
            f"{record.get('host', '?')}, since {record.get('acquired', '?')}, expires "
            f"{_iso(float(record.get('expires_at', 0) or 0))} unless renewed)")


def _create_local(path: str, record: dict) -> bool:
    """Creates a local lease file only if none exists (False if another process was first)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    return True


class StoreLease:
    """``with StoreLease(store, job="precompute"): ...`` holds the store's lease for the block."""

    def __init__(self, store: str, job: str, ttl: float = DEFAULT_TTL, settle: float = DEFAULT_SETTLE):
        if ttl <= 4 * settle:
            raise ValueError("the lease ttl must be well above its settle time")
        self.store, self.job, self.ttl, self.settle = store, job, ttl, settle
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None
        self._acquired = None
        self.lost = None  # why the heartbeat found the lease gone

    def _record(self) -> dict:
        now = _now()
        return {"format": FORMAT, "owner": self.owner, "job": self.job, "host": socket.gethostname(),
                "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                "acquired": self._acquired or _iso(now), "renewed": _iso(now),
                "expires_at": now + self.ttl, "ttl": self.ttl}

    def acquire(self) -> "StoreLease":
        current = read_lease(self.store)
        if current is not None:
            why = breakable(current)
            if why is None:
                raise LeaseHeld(f"{self.store} is being written by {describe(current)}; wait for it to "
                                f"finish, or rerun once it is gone (a dead job's lease is broken when its "
                                f"process is gone from this host, or {self.ttl:.0f} s after its last renewal)")
            log.warning("%s: breaking the lease of %s: %s", self.store, describe(current), why)
        self._acquired = _iso(_now())
        if current is None and "://" not in self.store:
            if not _create_local(lease_path(self.store), self._record()):  # O_EXCL: one creator wins, no wait
                raise LeaseHeld(f"{self.store}: another job took the lease at the same moment")
        else:
            storage.write_json_atomic(lease_path(self.store), self._record())
            time.sleep(self.settle)
        current = read_lease(self.store)
        if current is None or current.get("owner") != self.owner:
            raise LeaseHeld(f"{self.store}: another job took the lease at the same moment"
                            + (f": {describe(current)}" if current else ""))
        self._thread = threading.Thread(target=self._heartbeat, name="store-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = read_lease(self.store)
                if current is None or current.get("owner") != self.owner:
                    self.lost = "the lease was deleted" if current is None else f"taken over by {describe(current)}"
                    log.error("%s: lost the store lease (%s)", self.store, self.lost)
                    return
                storage.write_json_atomic(lease_path(self.store), self._record())
            except Exception as e:  # a transient store error: retried at the next beat, before expiry
                log.warning("%s: lease renewal failed (%s)", self.store, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = read_lease(self.store)
        if current is not None and current.get("owner") == self.owner:
            storage.delete_quietly([lease_path(self.store)])

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def check(store: str, owner: str) -> None:
    """Raises LeaseLost unless ``owner`` still holds a live lease on ``store`` (the commit's fence)."""
    current = read_lease(store)
    if current is None or current.get("owner") != owner:
        raise LeaseLost(f"{store}: this job no longer holds the store's lease ("
                        + ("none is held" if current is None else f"held by {describe(current)}")
                        + "); not committing")
    if _now() > float(current.get("expires_at", 0)):
        raise LeaseLost(f"{store}: this job's lease expired at {_iso(float(current['expires_at']))}; not committing")
