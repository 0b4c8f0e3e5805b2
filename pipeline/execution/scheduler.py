"""Drives a pool of annotator actors over units: bounded in-flight work, retries, isolation.

Each unit runs as one streaming actor call that yields progress (a few messages a
second) and then its summary. When an actor dies, it is replaced and its running unit
retried from scratch, one image at a time ("careful"), so the next crash names the
image that caused it. An image blamed for ``max_image_crashes`` crashes is isolated
(poisoned): the next attempt records it as failed without touching it. Isolation is
reported through ``on_isolate`` (the stage persists it in the output, so a rerun starts
with it excluded).

The retry budget is sized by what is found: a careful try that dies on a named image
is progress (that image is one crash closer to isolation, and there are finitely many
images), so it is not counted; only crashes that name no image count against
``max_unit_retries``. A unit with any number of crashing images therefore finishes
once only good images remain. A worker that Ray's memory monitor killed names no image
either: its death says nothing about the image it was on.

Work goes only to actors that are up: an actor (first or replacement) gets units once
its ``ready()`` call has returned. A replacement that cannot be placed (its node is
gone, no free resources) therefore holds no work; the others finish the run, and if no
actor at all is up for ``placement_timeout_s`` the run fails with an error saying so
instead of hanging.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from pipeline.inputs.entries import Unit

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


class PlacementError(RuntimeError):
    """No annotator actor could be started for ``placement_timeout_s``."""


class UnitScheduler:
    """Runs units on ``actors`` actors made by ``spawn()``.

    on_progress(images, masks, failed) is called for every progress message (with negative
    counts when a failed try's progress is taken back). suspect(unit) names the key a
    careful try of ``unit`` was processing when its worker died (None if unknown).
    poisoned: keys isolated before (key -> reason), skipped from the start; on_isolate(key,
    unit, reason) is called when a key is isolated. check() is called about once a second
    and may raise to stop the run (e.g. the output's lease was lost).
    placement_timeout_s: how long the run may go on with no actor up (none placed, or
    all lost and their replacements pending) before it fails with PlacementError.
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
        placement_timeout_s: float = 600.0,
        poisoned: dict[str, str] | None = None,
        on_isolate: Callable[[str, Unit, str], None] = lambda key, unit, reason: None,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        self.suspect = suspect
        self.spawn = spawn
        self.placement_timeout_s = placement_timeout_s
        self.slots = [spawn() for _ in range(actors)]
        # Per slot: its actor's pending ready() call, None once the actor is up.
        self.starting: list[Any] = [actor.ready.remote() for actor in self.slots]
        self.start_failures: list[int] = [0] * actors  # in a row, per slot
        self.none_up_since: float | None = time.monotonic()
        self.in_flight = units_in_flight_per_actor
        self.max_unit_retries = max_unit_retries
        self.max_image_crashes = max_image_crashes
        self.on_progress = on_progress
        self.crashes: dict[str, int] = defaultdict(int)
        self.outcome = Outcome(actors=[ActorStats() for _ in range(actors)], poisoned=dict(poisoned or {}))
        self.on_isolate = on_isolate
        self.check = check
        # Per slot, its calls in submission order: the first is the one running.
        self.running: list[deque] = [deque() for _ in range(actors)]
        self.calls: dict[Any, tuple[int, Attempt]] = {}

    def wait_ready(self, grace_s: float = 60.0) -> list[int]:
        """Blocks until every actor has loaded its model; model errors surface here.

        Returns the pids of the actors that are up. An actor that dies while starting is
        replaced; one still not placed ``grace_s`` after the first is up is left to join
        later (its slot gets work once it is up), so a lost node cannot stall the start.
        Raises PlacementError when none is up within ``placement_timeout_s``.
        """
        pids: dict[int, int] = {}
        first_up: float | None = None
        while any(ref is not None for ref in self.starting):
            pending = [ref for ref in self.starting if ref is not None]
            ready, _ = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                slot = self.starting.index(ref)
                pid = self._started(slot, ref)
                if pid is not None:
                    pids[slot] = pid
            if pids and first_up is None:
                first_up = time.monotonic()
            self._check_placement()
            if first_up is not None and time.monotonic() - first_up > grace_s:
                log.warning("%d actor(s) not started yet; going on with %d", len(pending) - len(ready), len(pids))
                break
        return [pids[slot] for slot in sorted(pids)]

    def close(self) -> None:
        """Stops every actor now, rather than whenever their handles are collected."""
        for actor in self.slots:
            ray.kill(actor, no_restart=True)

    def run(self, units: list[Unit]) -> Outcome:
        start = time.perf_counter()
        queue: deque[Attempt] = deque(Attempt(u) for u in units)
        while queue or self.calls:
            self.check()
            self._submit(queue)
            starting = [ref for ref in self.starting if ref is not None]
            ready, _ = ray.wait(list(self.calls) + starting, num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in self.calls:  # a death handled just before may have removed it
                    self._step(ref, queue)
                elif ref in self.starting:
                    self._started(self.starting.index(ref), ref)
            self._check_placement()
        self.outcome.seconds = time.perf_counter() - start
        return self.outcome

    def _started(self, slot: int, ref: Any) -> int | None:
        """Handles the end of a slot's ready() call; returns the pid if the actor is up.

        An error in the actor's ``__init__`` (e.g. the model cannot be loaded) is raised:
        every replacement would fail the same way. An actor that died or could not be
        created (its node lost) is replaced, at most ``max_unit_retries`` times in a row.
        """
        try:
            pid = ray.get(ref)
        except RayTaskError:
            raise
        except RayError as e:
            if isinstance(e, RayActorError) and e.actor_init_failed:
                raise
            self.start_failures[slot] += 1
            if self.start_failures[slot] > self.max_unit_retries:
                raise RuntimeError(f"worker {slot} died {self.start_failures[slot]} times in a row while starting: "
                                   f"{e}") from e
            log.warning("worker %d died while starting (%s); replacing it", slot, type(e).__name__)
            self._replace(slot)
            return None
        self.starting[slot] = None
        self.start_failures[slot] = 0
        self.none_up_since = None
        return pid

    def _check_placement(self) -> None:
        if any(ref is None for ref in self.starting):
            self.none_up_since = None
            return
        now = time.monotonic()
        if self.none_up_since is None:
            self.none_up_since = now
        if now - self.none_up_since > self.placement_timeout_s:
            resources = ray.available_resources()
            raise PlacementError(
                f"no annotator actor could be started for {self.placement_timeout_s:.0f} s "
                f"({len(self.slots)} waiting to be placed; the cluster has {len(ray.nodes())} "
                f"node(s) known, available resources {resources}): nodes were lost or the cluster "
                "lacks the CPUs/GPUs each actor asks for. Committed units are kept; rerun the "
                "same command once the cluster has capacity."
            )

    def _submit(self, queue: deque[Attempt]) -> None:
        for slot, actor in enumerate(self.slots):
            if self.starting[slot] is not None:
                continue  # not up yet (maybe never: its node may be gone), so no work
            while queue and len(self.running[slot]) < self.in_flight:
                attempt = queue.popleft()
                call = actor.process_unit.options(num_returns="streaming").remote(
                    attempt.unit, attempt.careful, self._poisoned_in(attempt.unit)
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
            attempt.images += message["images"]
            attempt.masks += message["masks"]
            attempt.failed += message["failed"]
            self.on_progress(message["images"], message["masks"], message["failed"])

    def _actor_died(self, slot: int, queue: deque[Attempt], error: Exception) -> None:
        calls = list(self.running[slot])
        for position, call in enumerate(calls):
            _, attempt = self.calls[call]
            self._forget(call)
            if position > 0:
                queue.appendleft(attempt)  # never started on that actor: not its fault
                continue
            self._take_back(attempt)
            memory = killed_for_memory(error)
            key = self.suspect(attempt.unit) if attempt.careful and not memory else None
            blamed = bool(key) and key not in self.outcome.poisoned
            if blamed:
                self._blame(key, attempt.unit)
            log.warning(
                "worker %d died during unit %d (try %d%s)%s; replacing it", slot, attempt.unit.index,
                attempt.number + 1, f", on {key}" if key else "", " killed for memory" if memory else "",
            )
            self._retry(attempt, queue, careful=True, reason=f"worker died repeatedly: {error}", counts=not blamed)
        self._replace(slot)

    def _replace(self, slot: int) -> None:
        """Kills the slot's actor and starts a new one, which gets work once it is up."""
        ray.kill(self.slots[slot], no_restart=True)
        self.slots[slot] = self.spawn()
        self.starting[slot] = self.slots[slot].ready.remote()
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
            self.on_isolate(key, unit, reason)

    def _retry(self, attempt: Attempt, queue: deque[Attempt], careful: bool, reason: str, counts: bool = True) -> None:
        """Queues the unit again; ``counts``: whether this try uses up the retry budget."""
        if counts and attempt.number >= self.max_unit_retries:
            self.outcome.failed[attempt.unit.index] = reason
            log.error("giving up on unit %d after %d tries: %s", attempt.unit.index, attempt.number + 1, reason)
            return
        queue.appendleft(Attempt(attempt.unit, number=attempt.number + int(counts), careful=careful))

    def _poisoned_in(self, unit: Unit) -> dict[str, str]:
        poisoned = self.outcome.poisoned
        return {i.key: poisoned[i.key] for i in unit.items if i.key in poisoned}

    def _take_back(self, attempt: Attempt) -> None:
        if attempt.images:
            self.on_progress(-attempt.images, -attempt.masks, -attempt.failed)

    def _forget(self, call: Any) -> None:
        slot, _ = self.calls.pop(call)
        self.running[slot].remove(call)


def killed_for_memory(error: Exception) -> bool:
    """Whether Ray says it killed the worker to free memory (its memory monitor)."""
    text = str(error).lower()
    return "memory monitor" in text or "due to memory pressure" in text or "out of memory" in text
