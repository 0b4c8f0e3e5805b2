"""One writer per output: a lease file that a run holds while it writes a dataset.

``<out>/lease.json`` names its holder (a random owner id, host, pid, start) and carries
a heartbeat the holder refreshes every ``ttl_s / 4``. A second run on the same output
(a resubmitted job, a node that was partitioned and kept running) finds a live lease and
stops with a message naming the holder; a lease whose heartbeat is older than ``ttl_s``,
or whose holder was a process of this host that no longer exists, is taken over, and the
takeover is logged. Workers check the lease before each commit
(``check``), so a run that lost its lease commits nothing more.

Atomicity: on a local or network file system the lease is created with ``os.link``
(fails if the file exists) and taken over with ``os.rename`` of the expired file, both
atomic, so two runs can never both believe they hold it. Object stores have no such
primitive through fsspec: there the lease is written, then read back after a short
pause, and a run that finds someone else's id stops; a race inside that window is
possible (documented in docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import psutil

from pipeline import storage

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the output's lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it looked expired to another run)."""


@dataclass
class Holder:
    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float
    ttl_s: float

    def expired(self, now: float) -> bool:
        """No heartbeat for ``ttl_s``, or the holder is a process of this host that is gone
        (a killed run rerun at once need not wait for its lease to time out)."""
        return now - self.heartbeat > self.ttl_s or self._dead_here()

    def _dead_here(self) -> bool:
        if self.host != socket.gethostname():
            return False
        try:
            # A live process with this pid that started after the lease is another one.
            return psutil.Process(self.pid).create_time() > self.started + 1.0
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    def describe(self, now: float) -> str:
        return (
            f"run {self.owner} (host {self.host}, pid {self.pid}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, last heartbeat "
            f"{now - self.heartbeat:.0f} s ago)"
        )


def read(output: str) -> Holder | None:
    """The current holder of ``output``'s lease, or None when there is no lease file."""
    fs, root = storage.filesystem(output)
    try:
        return Holder(**json.loads(fs.cat_file(storage.join(root, LEASE_FILE))))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:  # a damaged lease file holds nothing
        log.warning("%s: unreadable lease file (%s); treating it as expired", output, e)
        return Holder("unreadable", "?", 0, 0.0, 0.0, 0.0)


def check(output: str, owner: str) -> None:
    """Raises ``LeaseLost`` unless run ``owner`` still holds ``output``'s lease."""
    holder = read(output)
    if holder is None or holder.owner != owner:
        raise LeaseLost(
            f"{output}: this run ({owner}) no longer holds the output's lease"
            + (f"; it is held by {holder.describe(time.time())}" if holder else "")
        )


class Lease:
    """Holds ``output``'s lease from ``acquire()`` to ``release()`` (or the with-block).

    ``lost`` is set when a heartbeat finds the lease taken over; the holder should stop.
    """

    def __init__(self, output: str, ttl_s: float = 60.0) -> None:
        self.output = output
        self.ttl_s = float(ttl_s)
        self.owner = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fs, root = storage.filesystem(output)
        self._local = "file" in self._fs.protocol
        self._path = storage.join(root, LEASE_FILE)

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lease or raises ``LeaseHeld``; starts the heartbeat."""
        self._fs.makedirs(self._path.rsplit("/", 1)[0], exist_ok=True)
        now = time.time()
        holder = read(self.output)
        if holder is not None and not holder.expired(now):
            raise LeaseHeld(self._held_message(holder, now))
        if holder is not None:
            log.warning("%s: taking over the expired lease of %s", self.output, holder.describe(now))
        if self._local:
            self._acquire_local(holder)
        else:
            self._acquire_remote()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = read(self.output)
        if holder is not None and holder.owner == self.owner:
            self._fs.rm(self._path)

    def check(self) -> None:
        """Raises ``LeaseLost`` if a heartbeat found the lease taken over."""
        if self.lost.is_set():
            raise LeaseLost(f"{self.output}: the output's lease was taken over by another run; stopping")

    def confirm(self) -> None:
        """``check``, and the lease file read now: for a writer that must not write even in
        the seconds between heartbeats after a takeover (the annotation server's saves)."""
        self.check()
        try:
            check(self.output, self.owner)
        except LeaseLost:
            self.lost.set()
            raise

    # -- internals -----------------------------------------------------------------
    def _record(self, started: float | None = None) -> bytes:
        now = time.time()
        holder = Holder(self.owner, socket.gethostname(), os.getpid(), started or now, now, self.ttl_s)
        return json.dumps(asdict(holder)).encode("utf-8")

    def _acquire_local(self, expired: Holder | None) -> None:
        temp = f"{self._path}.{self.owner}.tmp"
        with open(temp, "wb") as f:
            f.write(self._record())
            f.flush()
            os.fsync(f.fileno())
        try:
            if expired is not None:
                # Only one taker's rename of the expired file succeeds; the others find
                # it gone (or find the winner's live lease when they look again).
                stale = f"{self._path}.expired-{self.owner}"
                try:
                    os.rename(self._path, stale)
                except FileNotFoundError:
                    pass
                else:
                    taken = read_file(stale)
                    os.unlink(stale)
                    if taken is not None and taken.owner != expired.owner:
                        # We moved a lease that a faster taker had just written: give it back.
                        with open(stale, "wb") as f:
                            f.write(json.dumps(asdict(taken)).encode("utf-8"))
                        try:
                            os.link(stale, self._path)
                        finally:
                            os.unlink(stale)
                        raise LeaseHeld(self._held_message(taken, time.time()))
            try:
                os.link(temp, self._path)  # atomic: fails if another run created it first
            except FileExistsError:
                holder = read(self.output)
                raise LeaseHeld(self._held_message(holder, time.time())) from None
        finally:
            os.unlink(temp)

    def _acquire_remote(self) -> None:
        self._fs.pipe_file(self._path, self._record())
        time.sleep(1.0)  # let a concurrent writer's object win or lose before reading back
        holder = read(self.output)
        if holder is None or holder.owner != self.owner:
            raise LeaseHeld(self._held_message(holder, time.time()))

    def _beat(self) -> None:
        started = time.time()
        while not self._stop.wait(self.ttl_s / 4):
            holder = read(self.output)
            if holder is None or holder.owner != self.owner:
                log.error("%s: lease lost to %s", self.output, holder.describe(time.time()) if holder else "nobody")
                self.lost.set()
                return
            started = holder.started
            with storage.atomic_open(self._fs, self._path) as f:
                f.write(self._record(started))

    def _held_message(self, holder: Holder | None, now: float) -> str:
        who = holder.describe(now) if holder else "another run"
        return (
            f"{self.output} is being written by {who}. Two runs on one output would interleave "
            f"their units: wait for that run to finish or stop it. If it is dead, its lease "
            f"expires {self.ttl_s:.0f} s after its last heartbeat and the next run takes over."
        )


def read_file(path: str) -> Holder | None:
    try:
        with open(path, "rb") as f:
            return Holder(**json.loads(f.read()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
