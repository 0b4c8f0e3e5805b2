"""SA-1B records and WebDataset shards: build, write with an atomic commit, read back.

A shard ``shards/sa_%06d.tar`` holds, per image, ``sa_<image_id>.jpg`` and
``sa_<image_id>.json`` side by side, exactly like the released SA-1B tars (SAM 2's
SA-1B loader parses the id from the name). This module owns member names, the key rule
and reading; which shards of a dataset are committed is ``pipeline.dataset.listing``'s.
"""
from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Iterator, Sequence

import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from pipeline import storage

log = logging.getLogger(__name__)

SHARD_PATTERN = "sa_{:06d}.tar"
SHARDS_DIR = "shards"
# Annotation ids are image_id * stride + index: unique across the dataset and the same
# on every rerun. Dense SA-1B settings give at most 3 masks x 3072 prompts per image.
ANNOTATION_ID_STRIDE = 1_000_000


def shard_name(unit_index: int) -> str:
    """``sa_000123.tar`` for unit 123."""
    return SHARD_PATTERN.format(unit_index)


def annotation_id(image_id: int, index: int) -> int:
    """Dataset-unique id of the ``index``-th mask of image ``image_id``."""
    if not 0 <= index < ANNOTATION_ID_STRIDE:
        raise ValueError(f"mask index {index} out of range for annotation ids")
    return image_id * ANNOTATION_ID_STRIDE + index


# The keys a mask record of the generator (coco_rle) has, converted to plain JSON types
# by sa1b_record; any other key of a mask record is stored as it is.
_MASK_KEYS = ("segmentation", "bbox", "area", "predicted_iou", "stability_score", "crop_box", "point_coords")


def sa1b_record(
    key: str,
    image_id: int,
    width: int,
    height: int,
    masks: Sequence[dict[str, Any]],
    **image_fields: Any,
) -> dict[str, Any]:
    """The SA-1B per-image JSON for ``masks`` as returned by the generator in coco_rle mode.

    Returns ``{"image": {image_id, width, height, file_name, **image_fields},
    "annotations": [...]}``, each annotation with: id, segmentation ({"size": [h, w],
    "counts": str}), bbox [x, y, w, h], area (int), predicted_iou, stability_score,
    crop_box [x, y, w, h] and point_coords [[x, y]], all plain JSON types, then the
    mask record's other keys (e.g. category_id, score) unchanged.
    ``image_fields``: extra keys of the image entry (this project writes ``source`` and
    ``source_sha256``, the input's path and the sha256 of its bytes, and, for masks a
    model made, ``model_family`` ("sam" or "sam2") and ``model_sha256``).
    """
    annotations = []
    for index, mask in enumerate(masks):
        rle = mask["segmentation"]
        counts = rle["counts"]
        annotations.append(
            {
                "id": annotation_id(image_id, index),
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                },
                "bbox": [float(v) for v in mask["bbox"]],
                "area": int(mask["area"]),
                "predicted_iou": float(mask["predicted_iou"]),
                "stability_score": float(mask["stability_score"]),
                "crop_box": [float(v) for v in mask["crop_box"]],
                "point_coords": [[float(x), float(y)] for x, y in mask["point_coords"]],
                **{k: v for k, v in mask.items() if k not in _MASK_KEYS},
            }
        )
    return {
        "image": {
            "image_id": image_id,
            "width": width,
            "height": height,
            "file_name": f"{key}.jpg",
            **image_fields,
        },
        "annotations": annotations,
    }


class ShardWriter:
    """Writes one shard; it appears under its final name only when closed without error.

    >>> with ShardWriter("out/shards/sa_000000.tar") as shard:
    ...     shard.write(key, jpeg_bytes, record)
    """

    def __init__(self, url: str) -> None:
        fs, path = storage.filesystem(url)
        self._opener = storage.atomic_open(fs, path)
        self._tar: wds.TarWriter | None = None
        self.count = 0

    def __enter__(self) -> "ShardWriter":
        stream = self._opener.__enter__()
        # A fixed mtime makes reruns produce byte-identical shards.
        self._tar = wds.TarWriter(stream, encoder=False, mtime=0.0)
        return self

    def write(self, key: str, jpeg: bytes, record: dict[str, Any]) -> None:
        assert self._tar is not None, "use ShardWriter as a context manager"
        payload = json.dumps(record, separators=(",", ":")).encode("utf-8")
        self._tar.write({"__key__": key, "jpg": jpeg, "json": payload})
        self.count += 1

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._tar is not None
        # Writes the tar's end blocks; the stream itself is closed and renamed by the opener.
        self._tar.close()
        return self._opener.__exit__(kind, error, traceback)


def split_member(name: str) -> tuple[str, str]:
    """``("dir/sa_1", "json")`` for ``dir/sa_1.json``: webdataset's rule, the key is the
    path up to the first dot of the basename and the rest is the extension."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


@dataclass
class Sample:
    """One image of a shard: its key, its parsed SA-1B record and (if asked) JPEG bytes.

    ``problem``: why the key's JSON is not a usable SA-1B record (then ``record`` is
    None); only yielded by ``iter_shard(..., problems=True)``.
    """

    key: str
    record: dict[str, Any] | None
    jpg: bytes | None
    shard: str  # the shard's URL
    problem: str | None = None


def iter_shard(url: str, images: bool = True, problems: bool = False) -> Iterator[Sample]:
    """Yields the samples of a shard in order, reading only what the project uses.

    Only ``.json`` (parsed with ``json.loads``) and, when ``images``, ``.jpg`` members
    are read; every other member (``.pyd``, ``.pth``, ...) is skipped unread, so a shard
    from anyone can never make a reader unpickle or execute anything. A key without a
    JSON record is skipped (it carries no annotations). A JSON member that does not
    parse or is not an SA-1B record (``record_problem``) costs that key only: it is
    logged and skipped, or, with ``problems``, yielded with its ``problem``. A tar that
    breaks raises ``ValueError`` naming the shard and the last key read.
    """
    key, parts = None, {}
    try:
        for member_key, ext, data in iter_members(url, ("json", "jpg") if images else ("json",)):
            if member_key != key:
                if key is not None and "json" in parts:
                    yield from _sample(url, key, parts, problems)
                key, parts = member_key, {}
            parts[ext] = data
    except (OSError, EOFError, tarfile.TarError) as e:
        raise ValueError(
            f"shard {url} is unreadable after key {key!r} (run +stage=validate): {type(e).__name__}: {e}"
        ) from e
    if key is not None and "json" in parts:
        yield from _sample(url, key, parts, problems)


def iter_members(url: str, extensions: tuple[str, ...]) -> Iterator[tuple[str, str, bytes]]:
    """Yields ``(key, extension, bytes)`` for the members of a shard with one of
    ``extensions``, in tar order; other members are skipped without being read."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as stream:
        for member in tar_file_iterator(stream, select_files=lambda n: split_member(n)[1] in extensions):
            key, ext = split_member(member["fname"])
            yield key, ext, member["data"]


def record_problem(record: Any) -> str | None:
    """Why ``record`` (a parsed JSON member) is not an SA-1B record, or None if it is one
    as far as the readers need: an ``image`` with integer id and size, and a list of
    annotations with an integer ``id`` and a ``segmentation`` holding ``size`` and
    ``counts``. RLE, bbox and area are left to ``+stage=validate``."""
    if not isinstance(record, dict):
        return f"not an SA-1B record: a JSON {type(record).__name__}, not an object"
    image = record.get("image")
    if not isinstance(image, dict):
        return "not an SA-1B record: no 'image' object"
    for name in ("image_id", "width", "height"):
        if not isinstance(image.get(name), int) or isinstance(image.get(name), bool):
            return f"not an SA-1B record: image.{name} is {image.get(name)!r}, not an integer"
    if image["width"] < 1 or image["height"] < 1:
        return f"not an SA-1B record: image size {image['width']}x{image['height']}"
    annotations = record.get("annotations")
    if not isinstance(annotations, list):
        return f"not an SA-1B record: 'annotations' is {type(annotations).__name__}, not a list"
    for i, ann in enumerate(annotations):
        segmentation = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(segmentation, dict) or "size" not in segmentation \
                or "counts" not in segmentation:
            return f"not an SA-1B record: annotation {i} has no segmentation with size and counts"
        if not isinstance(ann.get("id"), int):
            return f"not an SA-1B record: annotation {i} has no integer id"
    return None


def _sample(url: str, key: str, parts: dict[str, bytes], problems: bool) -> Iterator[Sample]:
    try:
        record = json.loads(parts["json"])
        problem = record_problem(record)
    except ValueError as e:
        problem = f"{key}.json is not valid JSON: {e}"
    if problem is None:
        yield Sample(key=key, record=record, jpg=parts.get("jpg"), shard=url)
    elif problems:
        yield Sample(key=key, record=None, jpg=None, shard=url, problem=problem)
    else:
        log.warning("%s: skipping %s: %s", url, key, problem)


def member_ranges(url: str, extensions: tuple[str, ...] = ("json", "jpg")) -> dict[str, tuple[int, int]]:
    """``{member name: (offset, size)}`` of a shard's members with one of ``extensions``:
    where each member's bytes lie in the tar, for reading one sample by byte range
    (``read_range``). Reads only the tar headers (no member data)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()
                if m.isfile() and split_member(m.name)[1] in extensions}


def read_range(url: str, offset: int, size: int) -> bytes:
    """``size`` bytes of ``url`` from ``offset``: one member of a shard (``member_ranges``)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
