"""The SA-1B validator: every check of a dataset's shards, manifest and plan
(``+stage=validate`` runs it over the committed shards).

Checks: tar integrity (readable members, end-of-archive marker, a .jpg and a .json per
key, no duplicate members), the JSON schema, the image decodes to the record's size,
each RLE decodes to the image size, area and bbox agree with the decoded mask, keys,
image ids and annotation ids are unique across the dataset, and, when the dataset has a
manifest, manifest and shards agree. Each problem names its shard and key.
"""
from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
from PIL import Image

from pipeline import storage
from pipeline.dataset import plan
from pipeline.dataset.rle import rle_problem

log = logging.getLogger(__name__)

_NUMBER = {"type": "number"}
_BOX = {"type": "array", "items": _NUMBER, "minItems": 4, "maxItems": 4}
SA1B_JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["image", "annotations"],
    "properties": {
        "image": {
            "type": "object",
            "required": ["image_id", "width", "height", "file_name"],
            "properties": {
                "image_id": {"type": "integer"},
                "width": {"type": "integer", "minimum": 1},
                "height": {"type": "integer", "minimum": 1},
                "file_name": {"type": "string"},
            },
        },
        "annotations": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "segmentation", "bbox", "area", "predicted_iou",
                             "stability_score", "crop_box", "point_coords"],
                "properties": {
                    "id": {"type": "integer"},
                    "segmentation": {
                        "type": "object",
                        "required": ["size", "counts"],
                        "properties": {
                            "size": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                     "minItems": 2, "maxItems": 2},
                            "counts": {"type": "string"},
                        },
                    },
                    "bbox": _BOX,
                    "area": {"type": "integer", "minimum": 0},
                    "predicted_iou": _NUMBER,
                    "stability_score": _NUMBER,
                    "crop_box": _BOX,
                    "point_coords": {"type": "array", "items": {
                        "type": "array", "items": _NUMBER, "minItems": 2, "maxItems": 2}},
                },
            },
        },
    },
}


@dataclass
class Problem:
    shard: str
    key: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"PROBLEM shard={self.shard} key={self.key or '-'} [{self.check}] {self.message}"


PROBLEM_SCHEMA = pa.schema([(n, pa.string()) for n in ("shard", "key", "check", "message")])


@dataclass
class ShardCheck:
    """Result of one shard: its problems, one (key, image_id, width, height, num_masks)
    row per readable record, and every annotation id with the index of its record."""

    shard: str
    problems: list[Problem] = field(default_factory=list)
    records: list[tuple[str, int, int, int, int]] = field(default_factory=list)
    ann_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ann_record: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), inclusive, of a decoded mask; None if empty."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if not len(cols):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def check_annotation(ann: dict, height: int, width: int, tol: float) -> list[tuple[str, str]]:
    """(check, message) problems of one schema-valid annotation."""
    seg = ann["segmentation"]
    prefix = f"annotation {ann['id']}:"
    problem = rle_problem(seg, height, width)
    if problem is not None:
        return [("rle", f"{prefix} {problem}")]
    mask = mask_utils.decode(seg)
    problems = []
    area = int(mask.sum())
    if ann["area"] != area:
        problems.append(("area", f"{prefix} area {ann['area']} but the decoded mask has {area} pixels"))
    box = _mask_bbox(mask)
    x, y, w, h = ann["bbox"]
    if box is None:
        if any(v != 0 for v in ann["bbox"]):
            problems.append(("bbox", f"{prefix} bbox {ann['bbox']} but the mask is empty"))
        return problems
    x0, y0, x1, y1 = box
    # Tolerance on w and h: SAM writes x1 - x0 (inclusive x1), COCO x1 - x0 + 1.
    if abs(x - x0) > tol or abs(y - y0) > tol or abs(w - (x1 - x0 + 1)) > tol \
            or abs(h - (y1 - y0 + 1)) > tol:
        problems.append(("bbox", f"{prefix} bbox {ann['bbox']} but the decoded mask spans "
                                 f"x {x0}..{x1}, y {y0}..{y1}"))
    return problems


def _iter_samples(path: str, name: str, problems: list[Problem]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Streams (key, {extension: bytes}) samples of a shard, one at a time (SA-1B
    shards are ~10 GB); tar-level problems are appended to ``problems``."""
    seen: set[str] = set()
    key, files = None, {}
    fs, fs_path = storage.filesystem(path)
    with fs.open(fs_path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    # webdataset's rule: the key is the basename up to its first dot, and
                    # the files of a sample are adjacent.
                    base = member.name.rsplit("/", 1)[-1]
                    member_key, _, ext = base.partition(".")
                    if member_key != key:
                        if key is not None:
                            yield key, files
                        if member_key in seen:
                            problems.append(Problem(name, member_key, "tar",
                                                    "key appears twice in the shard"))
                        seen.add(member_key)
                        key, files = member_key, {}
                    if ext in files:
                        problems.append(Problem(name, key, "tar", f"duplicate member {member.name}"))
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:  # stream mode returns short reads quietly
                        problems.append(Problem(name, key, "tar", f"member {member.name} is cut "
                                                f"at {len(data)} of {member.size} bytes"))
                    files[ext] = data
                end = tar.offset
        except (tarfile.TarError, EOFError, OSError) as exc:
            problems.append(Problem(name, key or "", "tar", f"unreadable after {len(seen)} keys: {exc}"))
            if files:
                yield key, files
            return
        if key is not None:
            yield key, files
        # tarfile stops quietly at a missing end-of-archive marker; a shard cut at a
        # member boundary is only caught here.
        size = f.size if getattr(f, "size", None) is not None else f.seek(0, 2)
        f.seek(end)
        tail = f.read(min(size - end, 1 << 16))
    if size - end < 1024 or tail.strip(b"\0"):
        problems.append(Problem(name, "", "tar", "no end-of-archive marker: the tar is truncated"))


def check_sample(result: ShardCheck, key: str, files: dict[str, bytes],
                 validator: jsonschema.protocols.Validator, decode_images: bool,
                 bbox_tolerance_px: float, ann_ids: list[int], ann_record: list[int]) -> None:
    """Checks one sample; problems, its record row and its annotation ids go to
    ``result``, ``ann_ids`` and ``ann_record``."""
    def report(check: str, message: str) -> None:
        result.problems.append(Problem(result.shard, key, check, message))

    if set(files) != {"jpg", "json"}:
        report("tar", f"files {sorted(files)}; expected jpg and json")
    if "json" not in files:
        return
    try:
        record = json.loads(files["json"])
    except ValueError as exc:
        report("json", f"not JSON: {exc}")
        return
    errors = sorted(validator.iter_errors(record), key=lambda e: [str(p) for p in e.path])
    for error in errors[:5]:
        report("schema", f"{'/'.join(map(str, error.path)) or '<root>'}: {error.message}")
    non_finite = list(_non_finite(record))
    for where in non_finite[:5]:  # NaN / Infinity: Python reads them, JSON has no such numbers
        report("json", f"{where}: a non-finite number (NaN or infinity is not JSON)")
    errors += non_finite
    try:
        image = record["image"]
        height, width, image_id = int(image["height"]), int(image["width"]), int(image["image_id"])
        num_masks = len(record["annotations"])
    except (KeyError, TypeError, ValueError):
        return
    # Listed even when an annotation breaks the schema, so the manifest and uniqueness
    # checks do not report a second, misleading problem for it.
    index = len(result.records)
    result.records.append((key, image_id, width, height, num_masks))
    if errors:
        return
    if "jpg" in files:
        try:
            with Image.open(io.BytesIO(files["jpg"])) as im:
                if decode_images:
                    im.load()
                if im.size != (width, height):
                    report("image", f"JPEG is {im.size[0]}x{im.size[1]}, record says {width}x{height}")
        except Exception as exc:  # PIL raises many types for corrupt files
            report("image", f"JPEG does not decode: {exc}")
    for ann in record["annotations"]:
        ann_ids.append(int(ann["id"]))
        ann_record.append(index)
        for check, message in check_annotation(ann, height, width, bbox_tolerance_px):
            report(check, message)


def _non_finite(value: Any, path: str = "") -> Iterator[str]:
    """Paths of the non-finite floats in a parsed JSON value."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path or "<root>"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{path}/{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{path}/{index}" if path else str(index))


def check_shard(path: str, decode_images: bool = True, bbox_tolerance_px: float = 1) -> ShardCheck:
    """Checks one shard on its own (cross-shard checks come later, from the result)."""
    result = ShardCheck(shard=posixpath.basename(path))
    validator = jsonschema.Draft202012Validator(SA1B_JSON_SCHEMA)
    ann_ids: list[int] = []
    ann_record: list[int] = []
    for key, files in _iter_samples(path, result.shard, result.problems):
        check_sample(result, key, files, validator, decode_images, bbox_tolerance_px,
                     ann_ids, ann_record)
    result.ann_ids = np.asarray(ann_ids, dtype=np.int64)
    result.ann_record = np.asarray(ann_record, dtype=np.int64)
    return result


def _duplicates(values: np.ndarray) -> np.ndarray:
    uniq, counts = np.unique(values, return_counts=True)
    return uniq[counts > 1]


def check_unique(checks: list[ShardCheck]) -> list[Problem]:
    """Keys, image ids and annotation ids that occur more than once in the dataset,
    one problem per occurrence so that every shard and key involved is named."""
    problems = []
    records = [(c.shard, *r) for c in checks for r in c.records]
    for column, label in ((1, "key"), (2, "image id")):
        seen: dict = defaultdict(list)
        for r in records:
            seen[r[column]].append(r)
        for value, where in seen.items():
            if len(where) > 1:
                problems += [Problem(r[0], r[1], "unique", f"{label} {value} occurs {len(where)} times")
                             for r in where]
    # Sorting arrays scales to 10^9 ids where a Python set would not.
    all_ids = np.concatenate([c.ann_ids for c in checks]) if checks else np.zeros(0, np.int64)
    dup = _duplicates(all_ids)
    for c in checks:
        for i in np.flatnonzero(np.isin(c.ann_ids, dup)):
            key = c.records[c.ann_record[i]][0]
            problems.append(Problem(c.shard, key, "unique", f"annotation id {c.ann_ids[i]} "
                                    "occurs more than once in the dataset"))
    return problems


def _shard_label(value: object) -> str:
    """Manifest ``shard`` as a file name, whether stored as a name, a path or an index."""
    if isinstance(value, (int, np.integer)):
        return f"sa_{int(value):06d}.tar"
    return Path(str(value)).name


def check_plan(dataset: str) -> list[Problem]:
    """The manifest against the run's recorded plan (``pipeline.dataset.plan.audit``): images of
    committed units missing from the manifest (lost), keys listed twice, keys the plan
    never gave out. Units not committed yet are no problem (the run is unfinished; it is
    printed so nobody mistakes a partial dataset for a whole one)."""
    found = plan.audit(dataset)
    if found is None:
        return []
    if found.pending:
        print(f"validate: {len(found.pending)} planned unit(s) not committed yet (rerun the stage to finish): "
              f"{found.pending[:10]}")
    return ([Problem("", key, "plan", "planned in a committed unit but missing from the manifest (lost)")
             for key in found.lost]
            + [Problem("", key, "plan", "listed more than once in the manifest (duplicated)")
               for key in found.duplicated]
            + [Problem("", key, "plan", "in the manifest but not in the run's plan") for key in found.unplanned])


def check_manifest(dataset: str, checks: list[ShardCheck], ok_status: str) -> list[Problem]:
    """Manifest parts against shards: one part per shard, same keys, same fields."""
    fs, root = storage.filesystem(dataset)
    parts = sorted(fs.glob(f"{root}/manifest/part_*.parquet"))
    if not parts:
        return []
    problems = []
    shard_records = {c.shard: {r[0]: r for r in c.records} for c in checks}
    part_shards = set()
    for part in parts:
        index = int(Path(part).stem.split("_")[1])
        expected = f"sa_{index:06d}.tar"
        part_shards.add(expected)
        # Rows of images that failed name no shard and have no sample.
        rows = [r for r in pq.read_table(part, filesystem=fs).to_pylist()
                if r.get("status", ok_status) == ok_status]
        if expected not in shard_records:
            if rows:
                problems.append(Problem(expected, "", "manifest", f"{Path(part).name} has no shard"))
            continue
        in_shard = shard_records[expected]
        listed = set()
        for row in rows:
            key, shard = row["key"], _shard_label(row["shard"])
            listed.add(key)
            if shard != expected:
                problems.append(Problem(expected, key, "manifest",
                                        f"{Path(part).name} names shard {shard}"))
            if key not in in_shard:
                problems.append(Problem(expected, key, "manifest", "in the manifest, not in the shard"))
                continue
            _, image_id, width, height, num_masks = in_shard[key]
            for column, actual in (("image_id", image_id), ("width", width), ("height", height),
                                   ("num_masks", num_masks)):
                if column in row and row[column] != actual:
                    problems.append(Problem(expected, key, "manifest",
                                            f"manifest {column} {row[column]}, shard {actual}"))
        problems += [Problem(expected, key, "manifest", "in the shard, not in the manifest")
                     for key in in_shard if key not in listed]
    problems += [Problem(c.shard, "", "manifest", "no manifest part: shard not committed")
                 for c in checks if c.shard not in part_shards]
    return problems


