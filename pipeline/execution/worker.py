"""The worker: loads a mask source once, then turns whole units into committed shards.

``UnitWorker`` is a plain class (usable and testable without Ray); stages wrap it with
``ray.remote`` and explicit resources, like a Ray Data predictor. What it asks for masks
is a mask source (``pipeline.masks.sources``: the point grid of fully_auto, box prompts,
...); reading, decoding, the shard, the manifest and the commit are the same for all.
A source that makes a new image from the input (augment pastes objects onto it) returns
``pipeline.masks.records.Rewritten``, and its image is stored instead of the input's.
Within a unit, decoding runs ahead in threads and shard writing runs behind in a thread,
so the model waits on neither; both queues are bounded, so memory is flat whatever the
unit size.
"""
from __future__ import annotations

import fnmatch
import json
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from pipeline import storage
from pipeline.dataset import lease, manifest, shards
from pipeline.inputs.entries import Item, ReadRefused, Unit, read_item
from pipeline.inputs.images import ImageError, PreparedImage, prepare_image, split_image_cfg
from pipeline.inputs.privacy import PrivacyUnavailable
from pipeline.masks import sources as mask_sources
from pipeline.masks.records import Rewritten
from pipeline.models.loader import model_family

Failure = tuple[str, str]  # (phase, reason) as written to the errors table
# Progress goes to the driver at most this often (plus once at the end of a unit): one
# Ray message per image cost ~25 ms of CPU per image on a 2-core machine, as much as the
# small model itself; a few messages per second keep the progress bar live at any speed.
PROGRESS_PERIOD_S = 0.5
# In careful tries, the key about to be processed is written here first: a worker's last
# progress messages die with it, this file does not, so the driver can blame the image.
INFLIGHT_DIR = ".inflight"


def inflight_url(output: str, unit_index: int) -> str:
    """Where a careful try of unit ``unit_index`` notes the key it is processing."""
    return storage.join(output, INFLIGHT_DIR, f"unit_{unit_index:06d}.txt")


def inflight_key(output: str, unit_index: int) -> str | None:
    """The key a careful try of the unit was processing when it stopped, if any."""
    fs, path = storage.filesystem(inflight_url(output, unit_index))
    try:
        return fs.cat_file(path).decode("utf-8") or None
    except FileNotFoundError:
        return None


class UnitWorker:
    """Annotates units with a mask source and commits them.

    source: the mask source's spec (``pipeline.masks.sources.build``), e.g. ``{"kind":
        "grid", "model": cfg.model, "amg": cfg.amg, "model_sha256": ...}``; the model's
        bytes are checked against ``model_sha256`` as they are loaded.
    image_cfg: ``stage.image``: keyword arguments of ``pipeline.inputs.images.prepare_image``
        plus the read limits (file size, read and decode time limits; see ``_load``).
    output: dataset root URL; model_sha256: identity written to the manifest.
    lease_owner: the driver's lease id; every commit first checks the run still holds
        the output's lease (None: no check, for tests and tools that own the output).
    prefetch: images decoded ahead of the model. threads: torch CPU threads (None: keep).
    kill_on: fnmatch patterns of sources on which the process kills itself, to test
        crash isolation for real (a hard kill, as a segfaulting decoder would die).
    """

    def __init__(
        self,
        source: dict[str, Any],
        image_cfg: dict[str, Any],
        output: str,
        model_sha256: str,
        lease_owner: str | None = None,
        prefetch: int = 2,
        threads: int | None = None,
        kill_on: tuple[str, ...] = (),
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.source = mask_sources.build(source)
        self.image_cfg = dict(image_cfg)
        self.output = output
        self.model_sha256 = model_sha256
        # Named in every image's record: what made its masks.
        self.model_fields = ({"model_family": model_family(source["model"]), "model_sha256": model_sha256}
                             if "model" in source else {})
        self.lease_owner = lease_owner
        self.prefetch = prefetch
        self.kill_on = tuple(kill_on)

    def ready(self) -> int:
        """Returns the worker's pid once the model is loaded."""
        return os.getpid()

    def process_unit(
        self, unit: Unit, careful: bool = False, poisoned: dict[str, str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Annotates and commits ``unit``; yields progress, then the unit's summary.

        Progress, every ``PROGRESS_PERIOD_S`` at most (and in careful tries after every
        image): ``{"images": n, "masks": m, "failed": f}`` for the images done since the
        previous one. Last: ``{"unit": index, "images": n, "masks": m, "errors": e,
        "seconds": busy time}``.
        ``careful`` decodes one image at a time and notes each key before touching it
        (see ``inflight_key``) so that a crash can be blamed on exactly one image, and
        keeps each finished image's result beside the note, so that the next careful try
        of the unit resumes after it instead of annotating the unit again;
        ``poisoned`` maps the keys to skip to the reason recorded for them.
        """
        start = time.perf_counter()
        poisoned = poisoned or {}
        shard = shards.shard_name(unit.index)
        shard_url = storage.join(self.output, shards.SHARDS_DIR, shard)
        rows: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        progress = _Progress(0.0 if careful else PROGRESS_PERIOD_S)
        memo = _CarefulMemo(self.output, unit.index) if careful else None
        if memo:
            self._note(unit.index, "")  # a crash before the first image blames no one
        with shards.ShardWriter(shard_url) as writer, ThreadPoolExecutor(1) as write_pool:
            pending_writes: deque[Future] = deque()
            for result in self._results(unit, shard, poisoned, memo):
                if result.error is not None:
                    errors.append(result.error)
                else:
                    pending_writes.append(write_pool.submit(writer.write, result.row["key"], result.jpeg,
                                                            result.record))
                    while len(pending_writes) > 2:
                        pending_writes.popleft().result()
                rows.append(result.row)
                if message := progress.add(masks=result.row["num_masks"], failed=int(result.error is not None)):
                    yield message
            for write in pending_writes:
                write.result()
        if message := progress.flush():
            yield message
        # Commit order matters: shard, then errors, then the manifest part that marks the
        # unit done. A crash in between only leaves files that the rerun rewrites. A run
        # that lost the output's lease to another run must not commit.
        if self.lease_owner is not None:
            lease.check(self.output, self.lease_owner)
        manifest.write_part(self.output, manifest.ERRORS_DIR, unit.index, errors)
        manifest.write_part(self.output, manifest.MANIFEST_DIR, unit.index, rows)
        if careful:
            self._note(unit.index, "")
        yield {
            "unit": unit.index,
            "images": len(rows),
            "masks": sum(r["num_masks"] for r in rows),
            "errors": len(errors),
            "seconds": time.perf_counter() - start,
        }

    def _results(
        self, unit: Unit, shard: str, poisoned: dict[str, str], memo: "_CarefulMemo | None"
    ) -> Iterator["_Result"]:
        """Each image's outcome in input order: from the memo of an earlier careful try,
        else read, decoded and annotated now (one at a time when careful)."""
        remembered = {i.key: memo.get(i.key) for i in unit.items} if memo else {}
        items = [i for i in unit.items if remembered.get(i.key) is None]
        note = (lambda key: self._note(unit.index, key)) if memo else None
        fresh = self._loaded(tuple(items), 0 if memo else self.prefetch, poisoned, note)
        for item in unit.items:
            if remembered.get(item.key) is not None:
                yield remembered[item.key]
                continue
            same, prepared, failure = next(fresh)
            assert same is item
            if failure is None:
                self._maybe_kill(item)
                masks, failure = self._annotate(item, prepared)
                if isinstance(masks, Rewritten):  # the source made a new image
                    masks, prepared = masks.masks, masks.image
            if failure is not None:
                phase, reason = failure
                result = _Result(
                    row=self._row(item, "", None, 0, manifest.STATUS_ERROR),
                    error={"key": item.key, "source": item.source, "phase": phase, "reason": reason},
                )
            else:
                record = shards.sa1b_record(
                    item.key, item.image_id, prepared.width, prepared.height, masks,
                    source=item.source, source_sha256=prepared.source_sha256, **prepared.record_fields(),
                    **self.model_fields,
                )
                result = _Result(row=self._row(item, shard, prepared, len(masks), manifest.STATUS_OK),
                                 record=record, jpeg=prepared.jpeg)
            if memo:
                memo.put(item.key, result)
            yield result

    def _loaded(
        self, items: tuple[Item, ...], window: int, poisoned: dict[str, str], note=None
    ) -> Iterator[tuple[Item, PreparedImage | None, Failure | None]]:
        """Yields ``(item, image, failure)`` in input order, decoding ``window`` ahead.

        With ``window`` 0 everything happens in this thread, one image at a time, and
        ``note(key)`` is called before each image is read.
        """
        if window == 0:
            for item in items:
                if note:
                    note(item.key)
                yield (item, *self._load(item, poisoned))
            return
        with ThreadPoolExecutor(window) as pool:
            queue: deque[tuple[Item, Future]] = deque()
            for item in items:
                queue.append((item, pool.submit(self._load, item, poisoned)))
                if len(queue) > window:
                    head, future = queue.popleft()
                    yield (head, *future.result())
            while queue:
                head, future = queue.popleft()
                yield (head, *future.result())

    def _load(self, item: Item, poisoned: dict[str, str]) -> tuple[PreparedImage | None, Failure | None]:
        """Reads and prepares one item within the time limits; never raises for the item.

        A read or decode that overruns ``stage.image.read_timeout_s`` /
        ``decode_timeout_s`` (a hung network mount, a pathological file) gets an error
        row and the unit goes on. Python cannot kill a thread, so the work runs in a
        daemon thread that is abandoned when it overruns: it finishes or stays blocked
        on its own without holding up the unit or the worker's exit. A subprocess could
        be killed, but would cost a copy of every image's bytes and pixels between
        processes; a stuck input is rare, and the careful retries already deal with a
        decoder that takes the whole process down.
        """
        if item.key in poisoned:
            return None, ("isolated", poisoned[item.key])
        if item.problem is not None:
            return None, ("enumerate", item.problem)
        limits, prepare_kwargs = split_image_cfg(self.image_cfg)
        attempt = _Attempt(item, limits["max_file_bytes"], prepare_kwargs)
        worker = threading.Thread(target=attempt.run, name=f"load {item.key}", daemon=True)
        worker.start()
        if not attempt.read_done.wait(limits["read_timeout_s"]):
            return None, ("read", _overrun("reading", "read_timeout_s", limits["read_timeout_s"]))
        if not attempt.done.wait(limits["decode_timeout_s"]):
            return None, ("decode", _overrun("decoding", "decode_timeout_s", limits["decode_timeout_s"]))
        if attempt.error is not None:
            raise attempt.error
        return attempt.result

    def _annotate(
        self, item: Item, prepared: PreparedImage
    ) -> tuple[list[dict] | Rewritten | None, Failure | None]:
        try:
            return self.source(item, prepared), None
        except torch.cuda.OutOfMemoryError:
            raise  # a property of the worker, not of the image: let the unit be retried
        except Exception as e:  # an image the model cannot handle must not sink the unit
            return None, ("annotate", f"mask generation failed: {type(e).__name__}: {e}")

    def _row(self, item: Item, shard: str, prepared: PreparedImage | None, num_masks: int,
             status: str) -> dict[str, Any]:
        return {
            "key": item.key,
            "image_id": item.image_id,
            "shard": shard,
            "source": item.source,
            "source_sha256": prepared.source_sha256 if prepared else "",
            "blurred_regions": prepared.blurred_regions if prepared else None,
            "width": prepared.width if prepared else 0,
            "height": prepared.height if prepared else 0,
            "num_masks": num_masks,
            "model_sha256": self.model_sha256,
            "status": status,
        }

    def _note(self, unit_index: int, key: str) -> None:
        fs, path = storage.filesystem(inflight_url(self.output, unit_index))
        with storage.atomic_open(fs, path) as f:
            f.write(key.encode("utf-8"))

    def _maybe_kill(self, item: Item) -> None:
        if any(fnmatch.fnmatch(item.source, pattern) for pattern in self.kill_on):
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Result:
    """One image's outcome: its manifest row, and its record and JPEG, or its error row."""

    row: dict[str, Any]
    record: dict[str, Any] | None = None
    jpeg: bytes | None = None
    error: dict[str, Any] | None = None


class _CarefulMemo:
    """Results of a careful try's finished images, kept beside its note in
    ``.inflight/unit_<n>/`` (removed with the note at start-up and after the run), so a
    unit with several crashing images is annotated about once, not once per crash."""

    def __init__(self, output: str, unit_index: int) -> None:
        self.fs, root = storage.filesystem(output)
        self.directory = storage.join(root, INFLIGHT_DIR, f"unit_{unit_index:06d}")

    def get(self, key: str) -> _Result | None:
        try:
            entry = json.loads(self.fs.cat_file(storage.join(self.directory, f"{key}.json")))
            jpeg = self.fs.cat_file(storage.join(self.directory, f"{key}.jpg")) if entry["record"] else None
        except FileNotFoundError:
            return None
        return _Result(row=entry["row"], record=entry["record"], jpeg=jpeg, error=entry["error"])

    def put(self, key: str, result: _Result) -> None:
        if result.jpeg is not None:  # the image first: the JSON (written last) marks it complete
            with storage.atomic_open(self.fs, storage.join(self.directory, f"{key}.jpg")) as f:
                f.write(result.jpeg)
        entry = {"row": result.row, "record": result.record, "error": result.error}
        with storage.atomic_open(self.fs, storage.join(self.directory, f"{key}.json")) as f:
            f.write(json.dumps(entry).encode("utf-8"))


class _Progress:
    """Counts images since the last message; returns a message when one is due."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.last = time.monotonic()
        self.counts = {"images": 0, "masks": 0, "failed": 0}

    def add(self, masks: int, failed: int) -> dict[str, int] | None:
        self.counts["images"] += 1
        self.counts["masks"] += masks
        self.counts["failed"] += failed
        return self.flush() if time.monotonic() - self.last >= self.period_s else None

    def flush(self) -> dict[str, int] | None:
        if not self.counts["images"]:
            return None
        message, self.counts = self.counts, {"images": 0, "masks": 0, "failed": 0}
        self.last = time.monotonic()
        return message


def _overrun(what: str, key: str, seconds: float) -> str:
    return (
        f"{what} did not finish within stage.image.{key}={seconds} s (a hung network file system, "
        "a device, or a pathological file); abandoned so the run goes on; raise the limit if it is genuine"
    )


class _Attempt:
    """Reads then prepares one item in its own thread; events mark the end of each phase."""

    def __init__(self, item: Item, max_file_bytes: int | None, prepare_kwargs: dict[str, Any]) -> None:
        self.item = item
        self.max_file_bytes = max_file_bytes
        self.prepare_kwargs = prepare_kwargs
        self.read_done = threading.Event()
        self.done = threading.Event()
        self.result: tuple[PreparedImage | None, Failure | None] = (None, None)
        self.error: BaseException | None = None  # raised again in the caller's thread

    def run(self) -> None:
        try:
            self.result = self._run()
        except BaseException as e:
            self.error = e
        finally:
            self.read_done.set()
            self.done.set()

    def _run(self) -> tuple[PreparedImage | None, Failure | None]:
        try:
            data = read_item(self.item, self.max_file_bytes)
        except FileNotFoundError:
            return None, ("read", "file not found: it was listed or enumerated but does not exist "
                                  "(deleted, moved, or a broken link)")
        except IsADirectoryError:
            return None, ("read", "is a directory, not an image file")
        except PermissionError:
            return None, ("read", "permission denied: make the file readable by the workers' user")
        except ReadRefused as e:
            return None, ("read", str(e))
        except OSError as e:
            return None, ("read", f"cannot read the file: {e}")
        except Exception as e:  # an unknown URL scheme, a file system's own error types...
            return None, ("read", f"cannot read the file: {type(e).__name__}: {e}")
        self.read_done.set()
        try:
            return prepare_image(data, **self.prepare_kwargs), None
        except ImageError as e:
            return None, ("decode", str(e))
        except PrivacyUnavailable:
            raise  # the installation's fault, not the image's: the unit fails and says why
        except MemoryError:
            return None, ("decode", "ran out of memory decoding it: "
                                    "lower stage.image.max_decoded_bytes or give workers more memory")
        except Exception as e:  # a decoder bug on one file must not sink the unit
            return None, ("decode", f"decoding failed: {type(e).__name__}: {e}")
