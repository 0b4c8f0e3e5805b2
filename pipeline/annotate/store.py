"""Saving annotation work: each image's working masks, saved atomically on every change,
and the commit of finished units into the dataset (SA-1B shard, errors, manifest last).

    <output>/annotate/work/<key>.json   the masks of an image not yet committed
    <output>/shards/sa_%06d.tar        committed units, as fully_auto writes them
    <output>/manifest/part_%06d.parquet

A unit is committed once every image of it is done (or failed); committed units are
never rewritten, so no image is ever written twice.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from pycocotools import mask as mask_utils

from pipeline import storage
from pipeline.annotate.queue import QueueImage
from pipeline.dataset import manifest, shards
from pipeline.inputs.images import PreparedImage

log = logging.getLogger(__name__)

WORK_DIR = "annotate"
# Provenance of a saved mask; AUTOMATIC marks a pre-filled mask nobody has reviewed yet.
AUTOMATIC = "automatic"
PROVENANCES = ("manual", "model_assisted", "automatic_accepted", "automatic_edited")
# A mask a person drew or corrected is not a prediction: it is recorded with full
# confidence, so the retrain stage's quality filters keep it.
PERSON_SCORE = 1.0


@dataclass
class ImageState:
    """The working state of one image.

    masks: dicts with uid, segmentation (compressed COCO RLE), provenance (one of
        PROVENANCES, or AUTOMATIC while unreviewed), clicks, strokes, seconds, annotator,
        point_coords; pre-filled masks also keep predicted_iou, stability_score, crop_box.
    done: the annotator marked the image done. error: why the image cannot be annotated,
    found in ``phase`` (enumerate, read or decode, as in the errors table). version: how
    many saves made this state (0: none yet); a save names the version it edits.
    """

    key: str
    masks: list[dict[str, Any]]
    done: bool = False
    error: str | None = None
    phase: str | None = None
    version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "masks": self.masks, "done": self.done, "error": self.error, "phase": self.phase,
                "version": self.version}


class Store:
    """Working states under ``<output>/annotate/work`` and the unit commits."""

    def __init__(self, output: str, check_output_lease: Callable[[], None] | None = None) -> None:
        self.output = output
        self.check_output_lease = check_output_lease
        self._fs, self._root = storage.filesystem(output)
        self.work_dir = storage.join(self._root, WORK_DIR, "work")
        self._fs.makedirs(self.work_dir, exist_ok=True)
        # What a killed server left half-written (this one holds the output's lease now).
        for directory in (self.work_dir, *(storage.join(self._root, d) for d in (
                shards.SHARDS_DIR, manifest.MANIFEST_DIR, manifest.ERRORS_DIR))):
            removed = storage.remove_temps(self._fs, directory)
            if removed:
                log.info("removed %d unfinished file(s) in %s left by a killed server", removed, directory)
        self._commit_lock = threading.Lock()
        self.committed = manifest.committed_units(output)

    def _path(self, key: str) -> str:
        # Keys come from the plan (``sa_<int>``), never from a request, so no path escapes.
        return storage.join(self.work_dir, f"{key}.json")

    def load(self, key: str) -> ImageState | None:
        try:
            data = json.loads(self._fs.cat_file(self._path(key)))
        except FileNotFoundError:
            return None
        return ImageState(data["key"], data["masks"], bool(data["done"]), data.get("error"), data.get("phase"),
                          int(data.get("version", 0)))

    def save(self, state: ImageState) -> None:
        """Atomically replaces the image's working state (a crash keeps the last save)."""
        with storage.atomic_open(self._fs, self._path(state.key)) as f:
            f.write(json.dumps(state.to_json(), separators=(",", ":")).encode("utf-8"))

    def finished(self, key: str) -> bool:
        state = self.load(key)
        return state is not None and (state.done or state.error is not None)

    def commit_unit(
        self, unit: int, entries: list[QueueImage], prepare: Callable[[QueueImage], PreparedImage], model_sha256: str,
        model_family: str = "sam",
    ) -> bool:
        """Writes the unit's shard, errors and manifest part if every image is finished
        and the unit is not committed yet; returns whether it committed now."""
        with self._commit_lock:
            if unit in self.committed or not all(self.finished(e.key) for e in entries):
                return False
            if self.check_output_lease is not None:
                self.check_output_lease()  # a run that lost the output commits nothing
            shard = shards.shard_name(unit)
            rows, errors = [], []
            with shards.ShardWriter(storage.join(self.output, shards.SHARDS_DIR, shard)) as writer:
                for entry in entries:
                    state = self.load(entry.key)
                    assert state is not None
                    row = {"key": entry.key, "image_id": entry.image_id, "source": entry.source,
                           "model_sha256": model_sha256}
                    if state.error is not None:
                        errors.append({"key": entry.key, "source": entry.source, "phase": state.phase or "read",
                                       "reason": state.error})
                        rows.append({**row, "shard": "", "source_sha256": "", "width": 0, "height": 0,
                                     "num_masks": 0, "status": manifest.STATUS_ERROR})
                        continue
                    image = prepare(entry)
                    masks = [dataset_mask(m, image.width, image.height) for m in state.masks]
                    record = shards.sa1b_record(entry.key, entry.image_id, image.width, image.height, masks,
                                                source=entry.source, source_sha256=image.source_sha256,
                                                model_family=model_family, model_sha256=model_sha256)
                    writer.write(entry.key, image.jpeg, record)
                    rows.append({**row, "shard": shard, "source_sha256": image.source_sha256, "width": image.width,
                                 "height": image.height, "num_masks": len(masks), "status": manifest.STATUS_OK})
            # The manifest part is the commit marker: written last.
            manifest.write_part(self.output, manifest.ERRORS_DIR, unit, errors)
            manifest.write_part(self.output, manifest.MANIFEST_DIR, unit, rows)
            self.committed.add(unit)
            log.info("committed unit %d: %s (%d images, %d failed)", unit, shard, len(rows), len(errors))
            return True


def dataset_mask(mask: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """A working mask as ``shards.sa1b_record`` takes it: area and bbox from its RLE."""
    rle = mask["segmentation"]
    if list(rle["size"]) != [height, width]:
        raise ValueError(f"mask {mask.get('uid')} is {rle['size']}, the image {height}x{width}")
    coco = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    automatic = mask["provenance"] == "automatic_accepted"
    return {
        "segmentation": rle,
        "area": int(mask_utils.area(coco)),
        "bbox": [float(v) for v in mask_utils.toBbox(coco)],
        "predicted_iou": mask.get("predicted_iou", PERSON_SCORE) if automatic else PERSON_SCORE,
        "stability_score": mask.get("stability_score", PERSON_SCORE) if automatic else PERSON_SCORE,
        "crop_box": (mask.get("crop_box") if automatic and mask.get("crop_box")
                     else [0.0, 0.0, float(width), float(height)]),
        "point_coords": mask.get("point_coords") or [],
        "provenance": mask["provenance"],
        "clicks": int(mask.get("clicks", 0)),
        "strokes": int(mask.get("strokes", 0)),
        "seconds": round(float(mask.get("seconds", 0.0)), 3),
        "annotator": str(mask.get("annotator", "")),
        **({"category_id": int(mask["category_id"])} if mask.get("category_id") is not None else {}),
    }
