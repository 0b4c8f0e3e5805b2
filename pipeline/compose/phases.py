"""The resumable phases of the composing stages (a loop round, an engine stage).

A phase is a folder: the model and settings it started with are compared with a rerun's
(``started_with``), the seconds of its parts are summed over invocations
(``timing.json``), its model's held-out figures are kept beside it (``evaluated``), and
``done.json``, written last, marks it finished. A rerun skips finished phases and
resumes a cut one with the settings it started with, or refuses, naming each difference.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from pipeline import storage
from pipeline.compose.settings import differences, flatten, shown
from pipeline.models import registry

DONE_FILE = "done.json"      # written last: its presence marks the phase finished
TIMING_FILE = "timing.json"  # seconds per part, summed over invocations


class Timing:
    """Seconds per part, accumulated in a JSON file across invocations (a part cut by a
    kill loses only the time of that attempt)."""

    def __init__(self, url: str):
        self.url = url
        self.seconds: dict[str, float] = storage.read_json(url) or {}

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] = round(self.seconds.get(part, 0.0) + seconds, 3)
        storage.write_json(self.url, self.seconds)


def started_with(url: str, now: dict[str, Any], what: str, record: bool = True) -> None:
    """Records ``now`` (the model and settings a phase starts with) at ``url`` the first
    time (when ``record``); refuses a rerun whose values differ, naming each leaf."""
    before = storage.read_json(url)
    if before is None:
        if record:
            storage.write_json(url, now)
        return
    differ = differences(flatten(before), flatten(now))
    if differ:
        raise RuntimeError(f"{what} was started with other settings than this run's: {shown(differ)}. "
                           "Rerun with the settings it started with to finish it, or use another output")


class Phase:
    """One phase's folder (``folder``): its done record, timing and evaluations."""

    def __init__(self, folder: str):
        self.folder = folder
        self._timing: Timing | None = None

    @property
    def done(self) -> dict[str, Any] | None:
        """The finished phase's record, or None."""
        return storage.read_json(storage.join(self.folder, DONE_FILE))

    def finish(self, record: dict[str, Any]) -> dict[str, Any]:
        """Writes the phase's record, last: the phase is finished."""
        storage.write_json(storage.join(self.folder, DONE_FILE), record)
        return record

    @property
    def timing(self) -> Timing:
        if self._timing is None:
            self._timing = Timing(storage.join(self.folder, TIMING_FILE))
        return self._timing

    def timed(self, part: str, work: Callable[[], Any]) -> Any:
        """``work()``, its seconds added to ``part``."""
        t0 = time.perf_counter()
        try:
            return work()
        finally:
            self.timing.add(part, time.perf_counter() - t0)

    def evaluated(self, model: str, out_dir: str, evaluate: Callable[[str, str], dict[str, Any]]) -> dict[str, Any]:
        """``model``'s held-out figures in ``out_dir``: the saved eval.json when it is this
        model's, else ``evaluate(model, out_dir)`` (which writes it), timed as ``eval``."""
        saved = storage.read_json(storage.join(out_dir, registry.EVAL_FILE))
        if saved is not None and saved.get("model") == model:
            return saved
        return self.timed("eval", lambda: evaluate(model, out_dir))


def is_trained(output: str, version: str, steps: int) -> bool:
    """Whether SAM version ``version`` under ``output`` is registered with all ``steps``."""
    summary = registry.read_summary(registry.version_dir(output, version))
    return summary is not None and bool(summary["complete"]) and summary["steps"] == steps
