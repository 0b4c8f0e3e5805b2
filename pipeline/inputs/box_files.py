"""Detector boxes on disk: a COCO instances JSON, a YOLO labels folder or a Parquet
table, read into one table and matched to the input's images by name.

What a box file may be (``stage.boxes``), and how its images are matched to the input's
entries (an entry's name is its path relative to ``input``, ``pipeline.inputs.entries``):

- COCO instances JSON (``*.json``): ``images[].file_name`` relative to the input folder
  (``train/cat.jpg`` matches ``<input>/train/cat.jpg``), or absolute. ``bbox`` [x, y, w, h]
  in pixels of the image as ``images[].width/height`` describe it; ``category_id``,
  ``score``, ``keypoints`` and ``segmentation`` (the box's ground truth, polygons or RLE)
  are optional; ``iscrowd`` boxes are skipped (they prompt groups, not objects).
- YOLO labels folder (a directory): ``<labels>/<sub>/<stem>.txt`` matches the input image
  ``<sub>/<stem>.<any ext>``, and, for an input that holds ``images/`` folders, the label
  path YOLO itself derives (the last ``/images/`` replaced by ``/labels/``). Lines:
  ``class cx cy w h`` normalised to [0, 1], then optionally ``conf``, or pose keypoints
  ``px py v`` triples (then optionally ``conf``). Class k is category id k.
- Parquet (``*.parquet``): one row per box, columns ``file_name`` or ``image``; ``bbox``
  [x, y, w, h] or ``x``, ``y``, ``w``, ``h``; optional ``category_id`` (int) or
  ``category`` (names, numbered 1.. in sorted order), ``score``, ``keypoints`` (flat x, y, v),
  ``width``/``height`` (the frame of the boxes). A row with a null box names an image
  with no box.

An image the file names with no box (a COCO image without annotations, an empty label
file) was looked at by the detector and holds nothing: it is kept, with no mask. An input
image the file does not name is not annotated, and a named image that is not in the
input is not found: both are reported (``Matching``), never silently dropped.

Coordinates are in the input image's pixels. The frame is the image as shown (EXIF
orientation applied, as OpenCV, ultralytics and most detectors read it), or, where the
file gives the image's size (COCO width/height, Parquet width/height), whichever frame
that size names (as shown, or as stored before rotation; also scaled, for a detector that
ran on a resized copy). ``stored_frame`` maps them into the stored image's pixels.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.inputs.entries import Entry, InputError

log = logging.getLogger(__name__)

TABLE_FILE = "boxes.parquet"  # the normalised table, recorded in the output at its first run
DEFAULT_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
SCHEMA = pa.schema(
    [
        ("name", pa.string()),  # the image as the file names it (YOLO: the label's path without .txt)
        ("x0", pa.float64()), ("y0", pa.float64()), ("x1", pa.float64()), ("y1", pa.float64()),  # null: no box
        ("normalized", pa.bool_()),  # coordinates in [0, 1] of the frame (YOLO)
        ("frame_width", pa.int32()), ("frame_height", pa.int32()),  # the frame the file declares; 0: unknown
        ("category_id", pa.int64()),
        ("score", pa.float64()),
        ("keypoints", pa.list_(pa.float64())),  # flat x, y, v
        ("segmentation", pa.string()),  # COCO segmentation as JSON: the box's ground truth
        ("prompt_id", pa.int64()),  # the annotation id (COCO) or line / row number
    ]
)


@dataclass
class Boxes:
    """A box file read into ``SCHEMA`` rows.

    kind: coco, yolo or parquet. root: the labels folder (YOLO) or the file. sha256: of
    the file's bytes (a YOLO folder: of its names and bytes), the dataset's record of which
    boxes made it. categories: COCO category entries. invalid: reasons of boxes dropped
    (non-finite, or no area). crowd: COCO crowd boxes skipped.
    """

    kind: str
    root: str
    table: pa.Table
    sha256: str
    categories: list[dict[str, Any]]
    invalid: list[str] = field(default_factory=list)
    crowd: int = 0


@dataclass
class Matching:
    """Input entries against a box file's images.

    entries: the input entries the file names (with or without boxes), in input order.
    names: entry name -> the file's name for it. unnamed: input entries the file does
    not name. missing: names of the file matching no input entry.
    """

    entries: list[Entry]
    names: dict[str, str]
    unnamed: list[Entry]
    missing: list[str]


def load(url: str) -> Boxes:
    """Reads the box file ``url`` (kind from its form: a folder is YOLO labels)."""
    fs, path = storage.filesystem(url)
    if fs.isdir(path):
        return _read_yolo(fs, path)
    lower = path.lower()
    if not fs.isfile(path):
        raise InputError(f"stage.boxes={url!r} does not exist")
    data = fs.cat_file(path)
    if lower.endswith(".json"):
        return _read_coco(url, data)
    if lower.endswith(".parquet"):
        return _read_parquet(url, data)
    raise InputError(
        f"stage.boxes={url!r}: expected a COCO instances .json, a YOLO labels folder or a .parquet table"
    )


def match(boxes: Boxes, entries: Sequence[Entry]) -> Matching:
    """Which input entries the box file names (the matching rule in the module doc)."""
    names = set(boxes.table.column("name").to_pylist())
    found: dict[str, str] = {}
    for entry in entries:
        for candidate in _candidates(boxes, entry):
            if candidate in names:
                found[entry.name] = candidate
                break
    matched = [e for e in entries if e.name in found]
    unnamed = [e for e in entries if e.name not in found]
    missing = sorted(names - set(found.values()))
    return Matching(entries=matched, names=found, unnamed=unnamed, missing=missing)


def _candidates(boxes: Boxes, entry: Entry) -> list[str]:
    if boxes.kind != "yolo":
        return [_normal(entry.name), entry.url]
    stems = [posixpath.splitext(_normal(entry.name))[0]]
    path = entry.url
    if entry.member is None and "/images/" in path:
        head, _, tail = path.rpartition("/images/")
        label = posixpath.splitext(f"{head}/labels/{tail}")[0]
        root = boxes.root.rstrip("/") + "/"
        if label.startswith(root):
            stems.append(label[len(root):])
    return stems


def write_table(output: str, boxes: Boxes, matching: Matching) -> None:
    """Records the matched part of the box file in ``<output>/boxes.parquet``, its names
    rewritten to the input entries' names (what the workers look items up by)."""
    by_file_name: dict[str, list[str]] = {}
    for entry_name, name in matching.names.items():
        by_file_name.setdefault(name, []).append(entry_name)
    rows = []
    for row in boxes.table.to_pylist():
        for entry_name in by_file_name.get(row["name"], ()):
            rows.append({**row, "name": entry_name})
    fs, root = storage.filesystem(output)
    with storage.atomic_open(fs, storage.join(root, TABLE_FILE)) as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), f)


def read_table(output: str) -> dict[str, list[dict[str, Any]]]:
    """``<output>/boxes.parquet`` as entry name -> its rows in file order."""
    fs, root = storage.filesystem(output)
    with fs.open(storage.join(root, TABLE_FILE), "rb") as f:
        rows = pq.read_table(f, schema=SCHEMA).to_pylist()
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["name"], []).append(row)
    return grouped


def has_table(output: str) -> bool:
    fs, root = storage.filesystem(output)
    return fs.exists(storage.join(root, TABLE_FILE))


# --------------------------------------------------------------------------- frames
def upright_size(original_size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of an image as shown: a quarter turn (EXIF 5-8) swaps the sides."""
    w, h = original_size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def raw_to_upright(xy: np.ndarray, original_size: tuple[int, int], orientation: int) -> np.ndarray:
    """Points (..., 2) in the decoded image's pixels (before EXIF rotation) -> the same
    points in the image as shown (what ``ImageOps.exif_transpose`` gives)."""
    w, h = original_size
    x, y = xy[..., 0], xy[..., 1]
    mapped = {
        1: (x, y), 2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y),
        5: (y, x), 6: (h - y, x), 7: (h - y, w - x), 8: (y, w - x),
    }.get(orientation, (x, y))
    return np.stack(mapped, axis=-1)


def raw_mask_to_upright(mask: np.ndarray, orientation: int) -> np.ndarray:
    """An HxW array in the decoded image's frame -> the image as shown (``raw_to_upright``)."""
    return {
        2: lambda m: m[:, ::-1], 3: lambda m: m[::-1, ::-1], 4: lambda m: m[::-1, :],
        5: lambda m: m.T, 6: lambda m: np.rot90(m, -1), 7: lambda m: m[::-1, ::-1].T, 8: lambda m: np.rot90(m, 1),
    }.get(orientation, lambda m: m)(mask)


def frame_of(
    row: dict[str, Any], original_size: tuple[int, int], orientation: int, box_frame: str
) -> tuple[str, tuple[float, float]]:
    """The frame a row's coordinates are in: ("raw" | "upright", its (width, height)).

    ``box_frame``: "auto" (the frame the row's declared size names; as shown when none,
    and when both frames have that size: flips and half turns keep it), "upright" or
    "raw". A declared size that is neither frame but has the shape of one (a detector
    ran on a resized copy) is that frame, scaled. Raises ``ValueError`` for a declared
    size that fits neither.
    """
    raw = tuple(float(v) for v in original_size)
    upright = tuple(float(v) for v in upright_size(original_size, orientation))
    if box_frame in ("raw", "upright"):
        frame = raw if box_frame == "raw" else upright
        declared = (float(row["frame_width"] or 0), float(row["frame_height"] or 0))
        return box_frame, declared if min(declared) > 0 else frame
    if box_frame != "auto":
        raise ValueError(f"stage.box_frame must be auto, upright or raw, not {box_frame!r}")
    declared = (float(row["frame_width"] or 0), float(row["frame_height"] or 0))
    if row["normalized"] or min(declared) <= 0:
        return "upright", upright
    for name, frame in (("upright", upright), ("raw", raw)):
        if declared == frame:
            return name, frame
    for name, frame in (("upright", upright), ("raw", raw)):
        if abs(declared[0] / declared[1] - frame[0] / frame[1]) <= 0.01 * frame[0] / frame[1]:
            return name, declared
    raise ValueError(
        f"the box file gives the image's size as {declared[0]:.0f}x{declared[1]:.0f}, but it is "
        f"{raw[0]:.0f}x{raw[1]:.0f} ({upright[0]:.0f}x{upright[1]:.0f} as shown): boxes for another image?"
    )


def stored_frame(
    xy: np.ndarray, row: dict[str, Any], original_size: tuple[int, int], orientation: int,
    stored_size: tuple[int, int], box_frame: str = "auto",
) -> np.ndarray:
    """Points (..., 2) of a row, in its frame (``frame_of``), -> the stored image's pixels."""
    name, (fw, fh) = frame_of(row, original_size, orientation, box_frame)
    xy = np.asarray(xy, dtype=np.float64)
    if row["normalized"]:
        xy = xy * (fw, fh)
    if name == "raw":
        w, h = original_size
        xy = raw_to_upright(xy * (w / fw, h / fh), original_size, orientation)
        fw, fh = upright_size(original_size, orientation)
    return xy * (stored_size[0] / fw, stored_size[1] / fh)


def stored_boxes(
    row: dict[str, Any], original_size: tuple[int, int], orientation: int, stored_size: tuple[int, int],
    box_frame: str = "auto",
) -> np.ndarray:
    """A row's box as XYXY edges in the stored image, clipped to it."""
    corners = np.array([[row["x0"], row["y0"]], [row["x1"], row["y1"]]])
    mapped = stored_frame(corners, row, original_size, orientation, stored_size, box_frame)
    x0, x1 = sorted(mapped[:, 0])
    y0, y1 = sorted(mapped[:, 1])
    w, h = stored_size
    return np.array([min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)])


# --------------------------------------------------------------------------- readers
# Every value of a box file is checked for what it must be before it is used: a file
# that is not the format at all, or whose images cannot be told apart, is refused
# (``InputError`` naming the file, the entry and the reason) before any work; a box that
# cannot prompt (no box, no area, a category or a class that is no whole number, YOLO
# coordinates that are pixels) is dropped and reported in ``Boxes.invalid``.
def _normal(name: str) -> str:
    name = name.replace("\\", "/")
    return posixpath.normpath(name) if "://" not in name else name


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> int | None:
    """``value`` as an int if it is a whole number (2.0 is, 2.9 and True are not), else None."""
    if isinstance(value, bool) or not _number(value) or float(value) != int(value):
        return None
    return int(value)


def _row(name: str, box_xywh: Any, *, where: str, normalized: bool = False, frame: Any = (0, 0),
         category_id: Any = 1, score: Any = None, keypoints: Any = None, segmentation: Any = None,
         prompt_id: Any = None, invalid: list[str]) -> dict[str, Any] | None:
    """One SCHEMA row; None (and a reason naming ``where`` in ``invalid``) for a box that
    cannot prompt. ``box_xywh`` None: the image is named, with no box."""
    row = {"name": _normal(name), "x0": None, "y0": None, "x1": None, "y1": None, "normalized": normalized,
           "frame_width": int(frame[0] or 0), "frame_height": int(frame[1] or 0), "category_id": 1, "score": None,
           "keypoints": None, "segmentation": None if segmentation is None else json.dumps(segmentation),
           "prompt_id": _whole(prompt_id)}
    if box_xywh is None:
        return row
    problems = []
    category = _whole(category_id)
    if category is None or category < 0:
        problems.append(f"category {category_id!r} is not a whole number >= 0")
    if score is not None and not _number(score):
        problems.append(f"score {score!r} is not a finite number")
    if keypoints is not None and (not isinstance(keypoints, list) or len(keypoints) % 3
                                  or not all(_number(v) for v in keypoints)):
        problems.append(f"keypoints {str(keypoints)[:60]} are not x, y, visibility triples")
    if not isinstance(box_xywh, (list, tuple)) or len(box_xywh) != 4 or not all(_number(v) for v in box_xywh):
        problems.append(f"bbox {str(box_xywh)[:60]} is not 4 finite numbers")
    else:
        x, y, w, h = (float(v) for v in box_xywh)
        if normalized and not all(-0.01 <= v <= 1.01 for v in (x, y, w, h)):
            problems.append(f"box {[x, y, w, h]} is not normalised to [0, 1] (pixel coordinates in a YOLO file?)")
        if normalized:  # YOLO: centre and size
            x, y = x - w / 2, y - h / 2
        if w <= 0 or h <= 0:
            problems.append(f"box {list(box_xywh)} has no area")
    if problems:
        invalid.append(f"{where}: " + "; ".join(problems))
        return None
    row.update(x0=x, y0=y, x1=x + w, y1=y + h, category_id=category,
               score=None if score is None else float(score),
               keypoints=None if keypoints is None else [float(v) for v in keypoints])
    return row


def _refuse(url: str, where: str, reason: str) -> InputError:
    return InputError(f"stage.boxes={url}: {where}: {reason}")


def _read_coco(url: str, data: bytes) -> Boxes:
    try:
        coco = json.loads(data)
    except ValueError as e:
        raise _refuse(url, "the file", f"not JSON ({e})") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise _refuse(url, "the file", "not a COCO instances JSON (no images list)")
    annotations = coco.get("annotations") or []
    categories = coco.get("categories") or [DEFAULT_CATEGORY]
    if not isinstance(annotations, list) or not isinstance(categories, list):
        raise _refuse(url, "annotations / categories", "not lists")
    images: dict[int, dict[str, Any]] = {}
    by_name: dict[str, tuple[int, Any]] = {}
    invalid: list[str] = []
    for index, image in enumerate(coco["images"]):
        where = f"images[{index}]"
        if not isinstance(image, dict):
            raise _refuse(url, where, f"not an object: {str(image)[:60]}")
        image_id = _whole(image.get("id"))
        if image_id is None:
            raise _refuse(url, where, f"id {image.get('id')!r} is not a whole number")
        name = image.get("file_name")
        if not isinstance(name, str) or not name:
            raise _refuse(url, f"{where} (id {image_id})", f"file_name {name!r} is not a file name")
        for side in ("width", "height"):
            if image.get(side) is not None and (_whole(image[side]) is None or image[side] <= 0):
                raise _refuse(url, f"{where} (id {image_id})", f"{side} {image[side]!r} is not a positive whole number")
        if image_id in images:  # the boxes of one would land on the other
            raise _refuse(url, where, f"image id {image_id} is also the id of image "
                                      f"{images[image_id]['file_name']!r}: image ids must be unique")
        size = (image.get("width"), image.get("height"))
        if name in by_name and by_name[name][1] != size:
            invalid.append(f"{where}: images {by_name[name][0]} and {image_id} are both {name!r}, at sizes "
                           f"{by_name[name][1]} and {size}: their boxes stay in the frame each declares")
        by_name.setdefault(name, (image_id, size))
        images[image_id] = image
    rows, crowd, boxed = [], 0, set()
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise _refuse(url, f"annotations[{index}]", f"not an object: {str(ann)[:60]}")
        where = f"annotation id {ann.get('id', index)!r}"
        image_id = _whole(ann.get("image_id"))
        image = images.get(image_id) if image_id is not None else None
        if image is None:
            invalid.append(f"{where}: names image id {ann.get('image_id')!r}, which the file does not list")
            continue
        if ann.get("iscrowd"):
            crowd += 1
            continue
        if ann.get("bbox") is None:
            invalid.append(f"{where}: bbox is null")
            continue
        row = _row(image["file_name"], ann["bbox"], where=where, frame=(image.get("width"), image.get("height")),
                   category_id=ann.get("category_id", 1), score=ann.get("score"), keypoints=ann.get("keypoints"),
                   segmentation=ann.get("segmentation") or None, prompt_id=ann.get("id"), invalid=invalid)
        if row is not None:
            rows.append(row)
            boxed.add(image_id)
    for image_id, image in images.items():  # looked at, nothing found: kept with no mask
        if image_id not in boxed:
            rows.append(_row(image["file_name"], None, where=f"image {image_id}",
                             frame=(image.get("width"), image.get("height")), invalid=invalid))
    return Boxes("coco", url, pa.Table.from_pylist(rows, schema=SCHEMA), hashlib.sha256(data).hexdigest(),
                 categories, invalid, crowd)


def _read_yolo(fs, root: str) -> Boxes:
    files = sorted(p for p in fs.find(root) if p.endswith(".txt"))
    if not files:
        raise InputError(f"stage.boxes={root!r}: a folder, but it holds no YOLO .txt label files")
    digest = hashlib.sha256()
    rows, invalid, classes = [], [], set()
    for path in files:
        relative = posixpath.relpath(path, root)
        data = fs.cat_file(path)
        digest.update(relative.encode() + b"\0" + hashlib.sha256(data).digest())
        name = posixpath.splitext(relative)[0]
        boxed = False
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            values = line.split()
            if not values:
                continue
            where = f"{relative}:{number}"
            try:
                numbers = [float(v) for v in values]
            except ValueError:
                invalid.append(f"{where}: not numbers: {line[:80]!r}")
                continue
            n = len(numbers)
            extra = n - 5
            if n < 5 or (extra % 3 not in (0, 1)):
                invalid.append(f"{where}: {n} values; expected class cx cy w h [conf] or pose triples")
                continue
            if not values[0].isdigit():  # 1.7 or -3: YOLO classes are 0, 1, 2, ...
                invalid.append(f"{where}: class {values[0]!r} is not a whole number >= 0")
                continue
            score = numbers[-1] if extra % 3 == 1 else None
            keypoints = numbers[5 : 5 + extra - extra % 3] or None
            row = _row(name, numbers[1:5], where=where, normalized=True, category_id=int(values[0]), score=score,
                       keypoints=keypoints, prompt_id=number, invalid=invalid)
            if row is not None:
                rows.append(row)
                classes.add(row["category_id"])
                boxed = True
        if not boxed:
            rows.append(_row(name, None, where=relative, normalized=True, invalid=invalid))
    categories = [{"id": k, "name": f"class_{k}", "supercategory": "object"} for k in sorted(classes)]
    return Boxes("yolo", storage.url(fs, root), pa.Table.from_pylist(rows, schema=SCHEMA), digest.hexdigest(),
                 categories or [DEFAULT_CATEGORY], invalid)


def _read_parquet(url: str, data: bytes) -> Boxes:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _refuse(url, "the file", f"not a readable Parquet table ({type(e).__name__}: {e})") from None
    columns = set(table.column_names)
    name_column = next((c for c in ("file_name", "image") if c in columns), None)
    has_xywh = {"x", "y", "w", "h"} <= columns
    if name_column is None or not ("bbox" in columns or has_xywh):
        raise InputError(
            f"stage.boxes={url}: a box table needs a file_name (or image) column and bbox (or x, y, w, h); "
            f"it has {table.column_names}"
        )
    records = table.to_pylist()
    names: dict[str, int] = {}
    if "category_id" not in columns and "category" in columns:
        found = {str(r["category"]) for r in records if r["category"] is not None}
        names = {n: i + 1 for i, n in enumerate(sorted(found))}
    rows, invalid = [], []
    for index, r in enumerate(records):
        where = f"row {index}"
        name = r[name_column]
        if not isinstance(name, str) or not name:
            invalid.append(f"{where}: {name_column} {name!r} is not a file name")
            continue
        frame = (r.get("width"), r.get("height"))
        if not all(v is None or (_whole(v) is not None and v > 0) for v in frame):
            invalid.append(f"{where}: width / height {frame} are not positive whole numbers")
            continue
        box = r["bbox"] if "bbox" in columns else (None if r["x"] is None else (r["x"], r["y"], r["w"], r["h"]))
        category = r.get("category_id") if "category_id" in columns else names.get(str(r.get("category")), 1)
        row = _row(name, box, where=where, frame=frame, category_id=1 if category is None else category,
                   score=r.get("score"), keypoints=r.get("keypoints"), prompt_id=index, invalid=invalid)
        if row is not None:
            rows.append(row)
    if names:
        categories = [{"id": i, "name": n, "supercategory": "object"} for n, i in names.items()]
    else:
        ids = sorted({r["category_id"] for r in rows})
        categories = [{"id": i, "name": f"class_{i}", "supercategory": "object"} for i in ids] or [DEFAULT_CATEGORY]
    return Boxes("parquet", url, pa.Table.from_pylist(rows, schema=SCHEMA), hashlib.sha256(data).hexdigest(),
                 categories, invalid)
