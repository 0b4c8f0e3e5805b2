"""One annotation session over an output: the queue, the leases, the saved work and the
image model, behind the operations the web API offers (``server.py`` maps them to HTTP).
"""
from __future__ import annotations

import logging
import posixpath
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipeline import storage
from pipeline.annotate.embeddings import ImageModel
from pipeline.annotate.queue import ImageLeases, Queue, QueueImage
from pipeline.annotate.rle import RleError, compressed_rle, uncompressed_counts
from pipeline.annotate.store import AUTOMATIC, WORK_DIR, ImageState, Store
from pipeline.dataset import manifest
from pipeline.dataset.lease import LeaseLost
from pipeline.dataset.rle import usable
from pipeline.inputs.entries import ReadRefused, read_item
from pipeline.inputs.images import ImageError, PreparedImage, prepare_image, split_image_cfg

log = logging.getLogger(__name__)


class Conflict(Exception):
    """The request cannot be done now (another annotator holds the image, it is committed)."""


class Invalid(ValueError):
    """The request's content is wrong (a mask of the wrong size, unreviewed masks on done)."""


class Unavailable(Exception):
    """The image cannot be annotated; its reason is recorded in the errors table."""


class Stale(Conflict):
    """A save of an older state of the image than its current one; ``current`` is the
    image's view now (what the browser should show instead)."""

    def __init__(self, message: str, current: dict[str, Any]) -> None:
        super().__init__(message)
        self.current = current


class Lost(Exception):
    """This server no longer holds the output's lease: it accepts no write."""


@dataclass
class ModelInfo:
    """What the browser needs to know of the model."""

    arch: str
    sha256: str
    img_size: int
    feature_shapes: list[tuple[int, ...]]  # the embedding's, then (SAM 2) the high-res maps'
    decoder_path: str
    family: str = "sam"

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        return self.feature_shapes[0]

    @property
    def mask_input_size(self) -> int:
        return 4 * self.embedding_shape[2]


class Session:
    """The annotate stage's state and operations (thread-safe: the server is threaded).

    image_cfg: keyword arguments of ``prepare_image``, plus ``max_file_bytes`` for
    ``read_item``. lookahead: images embedded ahead
    of the one an annotator opens. check_output_lease: raises when this run no longer
    holds the output (``pipeline.dataset.lease.Lease.check``), called before each commit.
    """

    def __init__(
        self, queue: Queue, output: str, sam, model: ModelInfo, image_cfg: dict[str, Any],
        lease_s: float = 120.0, lookahead: int = 2, cache_size: int = 16,
        check_output_lease: Callable[[], None] | None = None, categories: list[dict[str, Any]] | None = None,
    ) -> None:
        self.queue = queue
        self.categories = list(categories or [])  # the label set (COCO categories); empty: class-free
        self.output = output
        self.model = model
        # The time limits guard a batch run from one stuck input; here a person is waiting
        # on the image and sees the failure, so only the size limit applies.
        limits, self.image_cfg = split_image_cfg(dict(image_cfg))
        self.max_file_bytes = limits["max_file_bytes"]
        self.lookahead = lookahead
        self.store = Store(output, check_output_lease)
        self.check_output_lease = check_output_lease
        self.lost: str | None = None  # why this server stopped accepting writes
        self._write_lock = threading.RLock()  # one save or commit at a time
        self.leases = ImageLeases(storage.join(output, WORK_DIR), lease_s)
        self.images = ImageModel(sam, self._prepared_by_key, cache_size)
        self._prepared: OrderedDict[str, PreparedImage] = OrderedDict()
        self._cache_size = max(2, cache_size)
        self._lock = threading.RLock()
        self.dropped_prefill: dict[str, list[str]] = {}  # input masks that did not fit their image, by key
        for unit, _keys in queue.units.items():  # finished before a crash, not yet committed
            self._maybe_commit(unit)

    # --- images --------------------------------------------------------------------------
    def entry(self, key: str) -> QueueImage:
        entry = self.queue.by_key.get(key)
        if entry is None:
            raise KeyError(key)
        return entry

    def prepared(self, entry: QueueImage) -> PreparedImage:
        """The image as it is shown and stored; a failure is recorded and raises Unavailable."""
        with self._lock:
            if entry.key in self._prepared:
                self._prepared.move_to_end(entry.key)
                return self._prepared[entry.key]
        phase = "enumerate"
        try:
            if entry.item.problem:  # known before reading (e.g. gone from the input)
                raise ImageError(entry.item.problem)
            phase = "read"
            data = read_item(entry.item, self.max_file_bytes)
            phase = "decode"
            image = prepare_image(data, **self.image_cfg)
            self._check_prefill(entry, image)
        except (ImageError, ReadRefused, OSError) as e:
            reason = str(e) if isinstance(e, (ImageError, ReadRefused)) else f"{type(e).__name__}: {e}"
            self._record_error(entry, reason, phase)
            raise Unavailable(reason) from None
        with self._lock:
            self._prepared[entry.key] = image
            while len(self._prepared) > self._cache_size:
                self._prepared.popitem(last=False)
        return image

    def _prepared_by_key(self, key: str) -> PreparedImage:
        return self.prepared(self.entry(key))

    def _check_prefill(self, entry: QueueImage, image: PreparedImage) -> None:
        """Checks the image's input masks before anything decodes them: all of another
        size means the image was resized (an error row: its masks cannot be reviewed on
        it); a mask that does not fit is dropped and reported, the others are offered."""
        masks = self.queue.prefill.get(entry.key, [])
        sizes = {str(a.get("segmentation", {}).get("size")) if isinstance(a, dict) and isinstance(
            a.get("segmentation"), dict) else None for a in masks}
        if masks and len(sizes) == 1 and None not in sizes and sizes != {str([image.height, image.width])}:
            raise ImageError(
                f"its input masks are {masks[0]['segmentation']['size']} but the image is "
                f"{image.height}x{image.width} (resized by stage.image.short_side?)"
            )
        fit, problems = usable(masks, image.height, image.width)
        if problems:
            log.warning("%s (%s): %d input mask(s) cannot be offered and are left out: %s", entry.key, entry.source,
                        len(problems), "; ".join(problems[:5]))
            with self._lock:
                self.queue.prefill[entry.key] = fit
                self.dropped_prefill[entry.key] = problems

    def _record_error(self, entry: QueueImage, reason: str, phase: str) -> None:
        log.warning("%s (%s) cannot be annotated: %s", entry.key, entry.source, reason)
        with self._write_lock:
            try:
                self._check_output()
            except Lost:
                return  # the server that holds the output now records it
            if entry.unit in self.store.committed:
                return
            self.store.save(ImageState(entry.key, [], done=False, error=reason, phase=phase))
            self._maybe_commit(entry.unit)

    def jpeg(self, key: str) -> bytes:
        return self.prepared(self.entry(key)).jpeg

    def embedding(self, key: str) -> list[np.ndarray]:
        entry = self.entry(key)
        self.prepared(entry)  # raises Unavailable for a bad image, before the encoder sees it
        return self.images.embedding(key)

    # --- the queue -----------------------------------------------------------------------
    def lease(self, client: str, after: str | None = None, step: int = 1, key: str | None = None) -> QueueImage | None:
        """Gives ``client`` an image: ``key`` itself, or the next image to do after
        ``after`` (``step`` 1, wrapping around), or the previous one not committed
        (``step`` -1). Returns None when there is none; ``Lost`` once this server no
        longer holds the output."""
        self._check_output()
        if key is not None:
            entry = self.entry(key)
            if entry.unit in self.store.committed:
                raise Conflict(f"{key} is committed (unit {entry.unit}); committed images are read-only")
            if not self.leases.acquire(key, client):
                raise Conflict(f"{key} is being annotated by another annotator")
            self._prefetch(entry)
            return entry
        for entry in self._candidates(after, step):
            if entry.unit in self.store.committed or not self.leases.free_for(entry.key, client):
                continue
            state = self.store.load(entry.key)
            if state is not None and (state.error or (step > 0 and state.done)):
                continue
            try:
                self.prepared(entry)
            except Unavailable:
                continue
            if self.leases.acquire(entry.key, client):
                self._prefetch(entry)
                return entry
        return None

    def _candidates(self, after: str | None, step: int):
        entries = self.queue.entries
        start = self.queue.position[after] if after in self.queue.position else (-1 if step > 0 else len(entries))
        if step > 0:
            yield from entries[start + 1 :]
            yield from entries[: start + 1]
        else:
            yield from reversed(entries[: max(start, 0)])

    def _prefetch(self, entry: QueueImage) -> None:
        ahead = [entry.key]
        for other in self.queue.entries[self.queue.position[entry.key] + 1 :]:
            if len(ahead) > self.lookahead:
                break
            if other.unit not in self.store.committed and not self.store.finished(other.key):
                ahead.append(other.key)
        self.images.prefetch(ahead)

    def renew(self, key: str, client: str, version: int | None = None) -> None:
        """Extends ``client``'s lease on ``key``; Conflict when it has lost it: the image is
        committed, another client holds it, or its lease expired and the image was saved
        by someone else since ``version`` (the state the client has)."""
        self._check_output()
        entry = self.entry(key)
        with self._write_lock:
            holder = self.leases.holder(key)
            expired_and_changed = holder is None and version is not None and version != self.state(key).version
            if (entry.unit in self.store.committed or holder not in (None, client) or expired_and_changed
                    or not self.leases.acquire(key, client)):
                raise Conflict(f"{key} is no longer leased to this annotator")

    def release(self, key: str, client: str) -> None:
        self.leases.release(key, client)

    def image_list(self, client: str | None = None) -> list[dict[str, Any]]:
        """The queue for the page's image list: key, source file name, status (todo,
        done, failed, committed, taken: leased to another annotator)."""
        rows = []
        for entry in self.queue.entries:
            state = self.store.load(entry.key)
            holder = self.leases.holder(entry.key)
            if entry.unit in self.store.committed:
                status = "committed"
            elif state is not None and state.error:
                status = "failed"
            elif state is not None and state.done:
                status = "done"
            elif holder not in (None, client):
                status = "taken"
            else:
                status = "todo"
            rows.append({"key": entry.key, "name": posixpath.basename(entry.source.rstrip("/")), "status": status})
        return rows

    # --- masks ---------------------------------------------------------------------------
    def state(self, key: str) -> ImageState:
        """The saved state, else the masks the image came with (unreviewed)."""
        state = self.store.load(key)
        if state is not None:
            return state
        masks = []
        for i, ann in enumerate(self.queue.prefill.get(key, [])):
            masks.append({
                "uid": f"input-{i}", "segmentation": ann["segmentation"], "provenance": AUTOMATIC,
                "clicks": 0, "strokes": 0, "seconds": 0.0, "annotator": "", "point_coords": ann.get("point_coords", []),
                "predicted_iou": ann.get("predicted_iou"), "stability_score": ann.get("stability_score"),
                "crop_box": ann.get("crop_box"), "category_id": ann.get("category_id"),
            })
        return ImageState(key, masks)

    def view(self, key: str, client: str | None = None) -> dict[str, Any]:
        """An image for the browser: its place in the queue, size, masks (uncompressed
        column-major RLE counts), done / committed flags, whether ``client`` may edit, and
        the state's version (what a save names), and the input masks left out (``dropped``)."""
        entry = self.entry(key)
        image = self.prepared(entry)
        state = self.state(key)
        committed = entry.unit in self.store.committed
        return {
            "key": key, "image_id": entry.image_id, "source": entry.source,
            "index": self.queue.position[key], "total": len(self.queue.entries),
            "width": image.width, "height": image.height, "done": state.done, "committed": committed,
            "editable": not committed and client is not None and self.leases.holder(key) == client
                        and self.lost is None,
            "version": state.version, "dropped": self.dropped_prefill.get(key, []),
            "masks": [{**{k: v for k, v in m.items() if k != "segmentation"},
                       "counts": uncompressed_counts(m["segmentation"])} for m in state.masks],
        }

    def save(self, key: str, client: str, masks: list[dict[str, Any]], done: bool, version: int) -> dict[str, Any]:
        """Replaces the image's masks (and done flag) with what the browser holds, if the
        browser edited the image's current state (``version``).

        masks: dicts with uid, counts (uncompressed column-major RLE of the image size),
        provenance, clicks, strokes, seconds, annotator, point_coords. Returns {"saved": True,
        "version": the new state's, "committed": whether the image's unit was committed by
        this save}. A save is in the dataset once acknowledged: it is written and its unit
        committed under one lock, so a save either lands before its unit's commit (and is
        in it) or finds the unit committed (``Conflict``); a save of an older version than
        the image's is ``Stale`` (with the current state); a server that lost the output
        to another accepts none (``Lost``).
        """
        entry = self.entry(key)
        image = self.prepared(entry)  # before the lock: reading and decoding take time
        saved = [self._mask(mask, image) for mask in masks]
        if done and any(m["provenance"] == AUTOMATIC for m in saved):
            count = sum(m["provenance"] == AUTOMATIC for m in saved)
            raise Invalid(f"{count} automatic mask(s) are not reviewed yet: "
                          "accept or delete them before marking the image done")
        with self._write_lock:
            self._check_output()
            if entry.unit in self.store.committed:
                raise Conflict(f"{key} is committed (unit {entry.unit}); committed images are never rewritten")
            holder = self.leases.holder(key)
            if holder not in (None, client):
                raise Conflict(f"{key} is being annotated by another annotator; reload to get another image")
            current = self.state(key)
            if version != current.version:
                raise Stale(f"{key} was saved by someone else since you opened it (version {current.version}, "
                            f"yours {version}): reload it", self.view(key, client))
            if holder == client:
                self.leases.acquire(key, client)  # a save renews the lease
            # A save that arrives after its browser moved on (holder None) is still taken,
            # without taking the image back: the browser's lease is on its new image now.
            previous = {m["uid"]: m for m in current.masks}
            for mask in saved:
                kept = previous.get(mask["uid"], {})
                mask.update({k: kept[k] for k in ("predicted_iou", "stability_score", "crop_box")
                             if kept.get(k) is not None and k not in mask})
            self.store.save(ImageState(key, saved, done=done, version=current.version + 1))
            return {"saved": True, "version": current.version + 1, "committed": self._maybe_commit(entry.unit)}

    def _mask(self, mask: dict[str, Any], image: PreparedImage) -> dict[str, Any]:
        """A browser's mask as a working mask (compressed RLE), checked."""
        try:
            rle = compressed_rle(mask["counts"], image.height, image.width, mask["uid"])
        except RleError as e:
            raise Invalid(str(e)) from None
        category = mask.get("category_id")
        if category is not None and category not in {c["id"] for c in self.categories}:
            known = ", ".join(f"{c['id']} ({c['name']})" for c in self.categories) or "none: this session is class-free"
            raise Invalid(f"mask {mask['uid']}: category_id {category} is not a label of this session ({known})")
        return {**{k: v for k, v in mask.items() if k != "counts"}, "segmentation": rle}

    def _check_output(self) -> None:
        """Raises ``Lost`` once this server no longer holds the output (checked before every
        write: another server took over, and its commits must not mix with ours)."""
        if self.lost is None and self.check_output_lease is not None:
            try:
                self.check_output_lease()
            except LeaseLost as e:
                self.lost = str(e)
                log.error("%s; no save is accepted any more", e)
        if self.lost is not None:
            raise Lost(f"this server lost the output to another run and accepts no save: {self.lost}")

    def _maybe_commit(self, unit: int) -> bool:
        entries = [self.queue.by_key[k] for k in self.queue.units[unit]]
        return self.store.commit_unit(unit, entries, self.prepared, self.model.sha256, self.model.family)

    # --- progress ------------------------------------------------------------------------
    def progress(self) -> dict[str, int]:
        """images, done (finished, committed or not), failed, units, units_committed, lost
        (why this server accepts no save any more, else None)."""
        done = failed = 0
        table = manifest.read_table(self.output).select(["key", "status"]).to_pylist()
        committed_errors = {r["key"] for r in table if r["status"] == manifest.STATUS_ERROR}
        for entry in self.queue.entries:
            if entry.unit in self.store.committed:
                done += 1
                failed += entry.key in committed_errors
                continue
            state = self.store.load(entry.key)
            if state is not None:
                done += state.done or state.error is not None
                failed += state.error is not None
        return {"images": len(self.queue.entries), "done": done, "failed": failed,
                "units": len(self.queue.units), "units_committed": len(self.store.committed & set(self.queue.units)),
                "lost": self.lost}

    def finished(self) -> bool:
        return set(self.queue.units) <= self.store.committed

    def close(self) -> None:
        self.images.close()

