"""Drives a pool of annotator actors over units: bounded in-flight work, retries, isolation.

Each unit runs as one streaming actor call that yields per-image progress. When an
actor dies, it is replaced and its running unit retried from scratch, one image at a
time ("careful"), so the next crash names the image that caused it. An image blamed
for ``max_image_crashes`` crashes is poisoned: the next attempt records it as failed
without touching it, and the unit completes. Retries per unit are bounded.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from pipeline.sources import Unit

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    """One try of one unit on one actor."""

    unit: Unit
    number: int = 0  # retries so far
    careful: bool = False
    images: int = 0  # progress yielded so far in this try
    masks: int = 0
    failed: int = 0


@dataclass
class ActorStats:
    """Per actor slot: what it committed and how long it was busy doing so."""

    units: int = 0
    images: int = 0
    masks: int = 0
    seconds: float = 0.0
    restarts: int = 0


@dataclass
class Outcome:
    """What the scheduler achieved.

    committed: final per-unit summaries from the actors; seconds: annotation wall time;
    failed: unit index -> reason
    for units given up after all retries; poisoned: key -> reason for isolated images.
    """

    committed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # from all models loaded to the last unit done
    failed: dict[int, str] = field(default_factory=dict)
    poisoned: dict[str, str] = field(default_factory=dict)
    actors: list[ActorStats] = field(default_factory=list)


class UnitScheduler:
    """Runs units on ``actors`` actors made by ``spawn()``.

    on_progress(images, masks, failed) is called for every image yielded (with negative
    counts when a failed try's progress is taken back). suspect(unit) names the key a
    careful try of ``unit`` was processing when its worker died (None if unknown).
    """

    def __init__(
        self,
        spawn: Callable[[], "ray.actor.ActorHandle"],
        actors: int,
        units_in_flight_per_actor: int = 2,
        max_unit_retries: int = 4,
        max_image_crashes: int = 2,
        on_progress: Callable[[int, int, int], None] = lambda images, masks, failed: None,
        suspect: Callable[[Unit], str | None] = lambda unit: None,
    ) -> None:
        self.suspect = suspect
        self.spawn = spawn
        self.slots = [spawn() for _ in range(actors)]
        self.in_flight = units_in_flight_per_actor
        self.max_unit_retries = max_unit_retries
        self.max_image_crashes = max_image_crashes
        self.on_progress = on_progress
        self.crashes: dict[str, int] = defaultdict(int)
        self.outcome = Outcome(actors=[ActorStats() for _ in range(actors)])
        # Per slot, its calls in submission order: the first is the one running.
        self.running: list[deque] = [deque() for _ in range(actors)]
        self.calls: dict[Any, tuple[int, Attempt]] = {}

    def wait_ready(self) -> list[int]:
        """Blocks until every actor has loaded its model; model errors surface here."""
        return ray.get([actor.ready.remote() for actor in self.slots])

    def close(self) -> None:
        """Stops every actor now, rather than whenever their handles are collected."""
        for actor in self.slots:
            ray.kill(actor, no_restart=True)

    def run(self, units: list[Unit]) -> Outcome:
        start = time.perf_counter()
        queue: deque[Attempt] = deque(Attempt(u) for u in units)
        while queue or self.calls:
            self._submit(queue)
            ready, _ = ray.wait(list(self.calls), num_returns=1, timeout=1.0)
            for call in ready:
                if call in self.calls:  # a death handled just before may have removed it
                    self._step(call, queue)
        self.outcome.seconds = time.perf_counter() - start
        return self.outcome

    def _submit(self, queue: deque[Attempt]) -> None:
        for slot, actor in enumerate(self.slots):
            while queue and len(self.running[slot]) < self.in_flight:
                attempt = queue.popleft()
                call = actor.process_unit.options(num_returns="streaming").remote(
                    attempt.unit, attempt.careful, dict(self.outcome.poisoned)
                )
                self.running[slot].append(call)
                self.calls[call] = (slot, attempt)

    def _step(self, call: Any, queue: deque[Attempt]) -> None:
        slot, attempt = self.calls[call]
        try:
            message = ray.get(next(call))
        except StopIteration:
            self._forget(call)
            return
        except RayActorError as e:
            self._actor_died(slot, queue, e)
            return
        except RayTaskError as e:
            # A Python error, not a crash (e.g. output storage failing): retry, no blame.
            self._forget(call)
            self._take_back(attempt)
            self._retry(attempt, queue, careful=attempt.careful, reason=str(e).strip().splitlines()[-1])
            return
        if "unit" in message:
            stats = self.outcome.actors[slot]
            stats.units += 1
            stats.images += message["images"]
            stats.masks += message["masks"]
            stats.seconds += message["seconds"]
            self.outcome.committed.append(message)
        else:
            attempt.images += 1
            attempt.masks += message["masks"]
            attempt.failed += not message["ok"]
            self.on_progress(1, message["masks"], 0 if message["ok"] else 1)

    def _actor_died(self, slot: int, queue: deque[Attempt], error: Exception) -> None:
        calls = list(self.running[slot])
        for position, call in enumerate(calls):
            _, attempt = self.calls[call]
            self._forget(call)
            if position > 0:
                queue.appendleft(attempt)  # never started on that actor: not its fault
                continue
            self._take_back(attempt)
            key = self.suspect(attempt.unit) if attempt.careful else None
            if key:
                self._blame(key, attempt.unit)
            log.warning(
                "worker %d died during unit %d (try %d); replacing it", slot, attempt.unit.index, attempt.number + 1
            )
            self._retry(attempt, queue, careful=True, reason=f"worker died repeatedly: {error}")
        ray.kill(self.slots[slot], no_restart=True)
        self.slots[slot] = self.spawn()
        self.outcome.actors[slot].restarts += 1

    def _blame(self, key: str, unit: Unit) -> None:
        self.crashes[key] += 1
        if self.crashes[key] >= self.max_image_crashes:
            reason = (
                f"the worker process died {self.crashes[key]} times while reading, decoding or "
                "annotating this image; isolated so the run could go on (check the file, "
                "and the worker logs in /tmp/ray/session_latest/logs)"
            )
            self.outcome.poisoned[key] = reason
            source = next(i.source for i in unit.items if i.key == key)
            log.error("isolating %s: %s", source, reason)

    def _retry(self, attempt: Attempt, queue: deque[Attempt], careful: bool, reason: str) -> None:
        if attempt.number >= self.max_unit_retries:
            self.outcome.failed[attempt.unit.index] = reason
            log.error("giving up on unit %d after %d tries: %s", attempt.unit.index, attempt.number + 1, reason)
            return
        queue.appendleft(Attempt(attempt.unit, number=attempt.number + 1, careful=careful))

    def _take_back(self, attempt: Attempt) -> None:
        if attempt.images:
            self.on_progress(-attempt.images, -attempt.masks, -attempt.failed)

    def _forget(self, call: Any) -> None:
        slot, _ = self.calls.pop(call)
        self.running[slot].remove(call)
