"""Per-mask and per-image statistics of SA-1B-format shards, computed from the RLE.

Everything per mask comes from the compressed RLE through pycocotools (``area``,
``toBbox``, ``merge``) without decoding a mask, which is what keeps the per-mask table
fast enough for a billion masks. Only concavity needs the pixels: it is computed on a
stratified sample (a fixed number of masks per relative-size bin per shard, reservoir
sampled with a seed derived from the shard name) and is NaN for the other masks.

Definitions (also stated in the report):
- relative size = sqrt(mask area / image area), as in the SA-1B paper;
- centre = centre of the mask's bounding box, normalised by image width and height
  (the exact centroid would need a decode; the bbox centre is available from the RLE);
- concavity = 1 - mask area / convex-hull area, where the mask is the union of its
  pixel squares, so the hull is the hull of pixel corners and concavity lies in [0, 1);
- covered fraction = area of the union of an image's masks / image area.
"""
from __future__ import annotations

import json
import logging
import posixpath
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils

from pipeline import storage
from pipeline.dataset.rle import rle_problem
from pipeline.dataset.shards import iter_members, record_problem

log = logging.getLogger(__name__)

# Stratification of the concavity sample: relative-size bins, log-spaced like the
# paper's size axis, so that rare large masks are not drowned by small ones.
SIZE_BIN_EDGES = np.array([0.0, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0 + 1e-9])

MASK_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("image_id", pa.int64()),
        ("mask_id", pa.int64()),
        ("area", pa.int64()),
        ("rel_size", pa.float64()),
        ("bbox_x", pa.float32()),
        ("bbox_y", pa.float32()),
        ("bbox_w", pa.float32()),
        ("bbox_h", pa.float32()),
        ("center_x", pa.float32()),
        ("center_y", pa.float32()),
        ("concavity", pa.float32()),
        ("predicted_iou", pa.float32()),
        ("stability_score", pa.float32()),
        ("crop_x", pa.float32()),
        ("crop_y", pa.float32()),
        ("crop_w", pa.float32()),
        ("crop_h", pa.float32()),
        ("point_x", pa.float32()),
        ("point_y", pa.float32()),
    ]
)

IMAGE_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_masks", pa.int32()),
        ("covered_fraction", pa.float64()),
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("images", pa.int64()),
        ("masks", pa.int64()),
        ("bytes", pa.int64()),
        ("skipped", pa.int64()),
        ("table_cpu_s", pa.float64()),
        ("total_cpu_s", pa.float64()),
    ]
)


def _float_column(annotations: list[dict], name: str) -> list[float]:
    return [a.get(name, np.nan) for a in annotations]


def _box_columns(annotations: list[dict], name: str) -> np.ndarray:
    boxes = [a.get(name) or (np.nan,) * 4 for a in annotations]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _point_columns(annotations: list[dict]) -> np.ndarray:
    # SA-1B stores one prompt point per mask as [[x, y]]; missing points stay NaN.
    points = [(a.get("point_coords") or [(np.nan, np.nan)])[0] for a in annotations]
    return np.asarray(points, dtype=np.float32).reshape(-1, 2)


def _union(rles: list[dict], group: int = 8) -> dict:
    """Union of RLEs. pycocotools folds a list into one growing accumulator, O(n x runs);
    merging groups of 8 then the results was measured 20% faster on SA-1B-sized masks."""
    while len(rles) > 1:
        rles = [mask_utils.merge(rles[i : i + group], intersect=False)
                if len(rles[i : i + group]) > 1 else rles[i]
                for i in range(0, len(rles), group)]
    return rles[0]


def image_mask_columns(record: dict) -> dict[str, np.ndarray]:
    """Per-mask columns of one SA-1B record, from the compressed RLE only.

    Returns a dict of equal-length arrays keyed like ``MASK_SCHEMA`` minus ``shard``,
    ``key``, ``image_id`` and ``concavity``; plus ``"covered_fraction"``, a 0-d array
    with the image's covered fraction.
    """
    image = record["image"]
    annotations = record["annotations"]
    height, width = int(image["height"]), int(image["width"])
    n = len(annotations)
    if n == 0:
        empty = np.zeros(0, dtype=np.float32)
        columns = {name: empty for name in MASK_SCHEMA.names[3:] if name != "concavity"}
        columns["mask_id"] = np.zeros(0, dtype=np.int64)
        columns["area"] = np.zeros(0, dtype=np.int64)
        columns["covered_fraction"] = np.asarray(0.0)
        return columns
    rles = [a["segmentation"] for a in annotations]
    area = mask_utils.area(rles).astype(np.int64)
    bbox = mask_utils.toBbox(rles).astype(np.float32)
    covered = float(mask_utils.area(_union(rles)))
    crop = _box_columns(annotations, "crop_box")
    point = _point_columns(annotations)
    return {
        "mask_id": np.asarray([a["id"] for a in annotations], dtype=np.int64),
        "area": area,
        "rel_size": np.sqrt(area / float(height * width)),
        "bbox_x": bbox[:, 0],
        "bbox_y": bbox[:, 1],
        "bbox_w": bbox[:, 2],
        "bbox_h": bbox[:, 3],
        "center_x": (bbox[:, 0] + bbox[:, 2] / 2) / width,
        "center_y": (bbox[:, 1] + bbox[:, 3] / 2) / height,
        "predicted_iou": np.asarray(_float_column(annotations, "predicted_iou"), np.float32),
        "stability_score": np.asarray(_float_column(annotations, "stability_score"), np.float32),
        "crop_x": crop[:, 0],
        "crop_y": crop[:, 1],
        "crop_w": crop[:, 2],
        "crop_h": crop[:, 3],
        "point_x": point[:, 0],
        "point_y": point[:, 1],
        "covered_fraction": np.asarray(covered / float(height * width)),
    }


def concavity(mask: np.ndarray) -> float:
    """1 - area / convex-hull area of a binary mask seen as a union of pixel squares.

    Uses the outer contours only (the hull of a shape is the hull of its boundary) and
    the four corners of each contour pixel, so the hull contains every pixel square.
    """
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    area = int(mask.sum())
    if area == 0:
        return float("nan")
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    # Crop to the bounding box first: contours of a 3 MP mask cost far more than the mask.
    crop = mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    centres = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    offsets = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    corners = (centres[:, None, :] + offsets[None]).reshape(-1, 2).astype(np.float32)
    hull_area = cv2.contourArea(cv2.convexHull(corners))
    return float(max(0.0, 1.0 - area / hull_area))


def rle_concavity(rle: dict) -> float:
    """``concavity`` of an RLE mask, computed on its bounding-box crop: the contour
    search and the copy to C order then cost the object's size, not the image's. NaN for
    counts that do not tile the mask (checked before anything decodes them)."""
    if rle_problem(rle, *rle["size"]) is not None:
        return float("nan")
    x, y, w, h = mask_utils.toBbox(rle).astype(int)
    return concavity(mask_utils.decode(rle)[y : y + h, x : x + w])


@dataclass
class _Reservoir:
    """Seeded reservoir sample of (row, rle) per relative-size bin."""

    capacity: int
    rng: np.random.Generator
    seen: np.ndarray = field(default_factory=lambda: np.zeros(len(SIZE_BIN_EDGES) - 1, np.int64))
    items: list[list[tuple[int, dict]]] = field(
        default_factory=lambda: [[] for _ in range(len(SIZE_BIN_EDGES) - 1)]
    )

    def offer(self, first_row: int, rel_size: np.ndarray, rles: list[dict]) -> None:
        bins = np.clip(np.searchsorted(SIZE_BIN_EDGES, rel_size, side="right") - 1, 0,
                       len(self.items) - 1)
        for i, b in enumerate(bins):
            self.seen[b] += 1
            if len(self.items[b]) < self.capacity:
                self.items[b].append((first_row + i, rles[i]))
            else:
                j = int(self.rng.integers(self.seen[b]))
                if j < self.capacity:
                    self.items[b][j] = (first_row + i, rles[i])


@dataclass
class ShardStats:
    """Statistics of one shard: ``masks`` (MASK_SCHEMA), ``images`` (IMAGE_SCHEMA),
    ``shard`` (one SHARD_SCHEMA row, with the CPU seconds of this thread from JSON bytes
    to the per-mask and per-image tables, ``table_cpu_s``, and in all, ``total_cpu_s``,
    which adds reading the tar and the concavity sample) and ``skipped``: (key, reason) of
    records that could not be read."""

    masks: pa.Table
    images: pa.Table
    shard: pa.Table
    skipped: list[tuple[str, str]]


def shard_stats(path: str, concavity_per_bin: int = 64, seed: int = 0) -> ShardStats:
    """Computes the per-mask, per-image and per-shard tables of one shard."""
    # pyarrow initialises lazily on its first conversion (~0.2 s once per process);
    # done here so that start-up is not billed to the per-mask throughput.
    pa.array([0])
    total_start = time.thread_time()
    name = posixpath.basename(path)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    reservoir = _Reservoir(concavity_per_bin, rng)
    mask_parts: list[dict[str, np.ndarray]] = []
    image_rows: dict[str, list] = {k: [] for k in IMAGE_SCHEMA.names}
    mask_keys: list[str] = []
    mask_image_ids: list[int] = []
    skipped: list[tuple[str, str]] = []
    table_cpu = 0.0
    rows = 0
    for key, _, data in iter_members(path, ("json",)):
        # Timed from the JSON bytes: parsing is part of making the per-mask table.
        start = time.thread_time()
        try:
            record = json.loads(data)
            problem = record_problem(record)
            if problem:
                skipped.append((key, problem))
                continue
            image = record["image"]
            size = [int(image["height"]), int(image["width"])]
            fit = [a for a in record["annotations"] if list(a["segmentation"]["size"]) == size]
            if len(fit) < len(record["annotations"]):  # never decoded, never summed as this image's
                skipped.append((key, f"{len(record['annotations']) - len(fit)} mask(s) whose RLE size is not the "
                                     f"image's {size}: left out of the tables"))
                record = {**record, "annotations": fit}
            columns = image_mask_columns(record)
        except Exception as exc:  # a broken record must not hide the rest of the shard
            skipped.append((key, f"{type(exc).__name__}: {exc}"))
            continue
        n = len(columns["mask_id"])
        mask_parts.append(columns)
        mask_keys.append(key)
        mask_image_ids.append(int(image["image_id"]))
        for column, value in (
            ("shard", name), ("key", key), ("image_id", image["image_id"]),
            ("file_name", image.get("file_name", f"{key}.jpg")), ("width", image["width"]),
            ("height", image["height"]), ("num_masks", n),
            ("covered_fraction", float(columns["covered_fraction"])),
        ):
            image_rows[column].append(value)
        table_cpu += time.thread_time() - start
        if concavity_per_bin > 0 and n:
            reservoir.offer(rows, columns["rel_size"], [a["segmentation"] for a in record["annotations"]])
        rows += n

    start = time.thread_time()
    counts = [len(part["mask_id"]) for part in mask_parts]
    arrays: dict[str, Any] = {
        "shard": pa.array([name] * rows, pa.string()),
        "key": pa.array(np.repeat(np.asarray(mask_keys, dtype=object), counts), pa.string()),
        "image_id": np.repeat(np.asarray(mask_image_ids, dtype=np.int64), counts),
    }
    for column in MASK_SCHEMA.names[3:]:
        if column != "concavity":
            arrays[column] = (np.concatenate([p[column] for p in mask_parts])
                              if mask_parts else np.zeros(0))
    table_cpu += time.thread_time() - start
    conc = np.full(rows, np.nan, dtype=np.float32)
    for bin_items in reservoir.items:
        for row, rle in bin_items:
            conc[row] = rle_concavity(rle)
    arrays["concavity"] = conc
    masks = pa.table({c: arrays[c] for c in MASK_SCHEMA.names}).cast(MASK_SCHEMA)
    images = pa.table(image_rows).cast(IMAGE_SCHEMA)
    fs, fs_path = storage.filesystem(path)
    size = int(fs.size(fs_path))
    shard = pa.table(
        {"shard": [name], "images": [images.num_rows], "masks": [rows], "bytes": [size],
         "skipped": [len(skipped)], "table_cpu_s": [table_cpu],
         "total_cpu_s": [time.thread_time() - total_start]}
    ).cast(SHARD_SCHEMA)
    return ShardStats(masks=masks, images=images, shard=shard, skipped=skipped)


# Bins of the report, fixed so that per-batch histograms add up across a dataset of any
# size without holding the masks in memory.
MASKS_PER_IMAGE_EDGES = np.array([0, 11, 51, 101, 201, np.iinfo(np.int64).max])
MASKS_PER_IMAGE_LABELS = ["≤10", "11-50", "51-100", "101-200", ">200"]
REL_SIZE_EDGES = np.concatenate([[0.0], np.logspace(-4, 0, 41)[:-1], [1.0 + 1e-9]])
CONCAVITY_EDGES = np.linspace(0.0, 1.0, 21)
SCORE_EDGES = np.linspace(0.0, 1.2, 121)
CENTRE_BINS = 50


def summarize(stats_dir: str | Path, batch_size: int = 1 << 20) -> dict[str, Any]:
    """Aggregates ``masks.parquet``, ``images.parquet`` and ``shards.parquet`` of
    ``stats_dir`` (a folder or an fsspec URL); a table that is absent has no rows.

    Returns a dict with:
    - ``images``, ``masks``, ``shards``, ``bytes``, ``skipped``: totals;
    - ``masks_per_image_mean`` / ``_median``, ``covered_fraction_mean``;
    - ``masks_per_image_hist``: percent of images per ``MASKS_PER_IMAGE_LABELS`` bin;
    - ``rel_size_hist``: percent of masks per ``REL_SIZE_EDGES`` bin;
    - ``centre_hist``: CENTRE_BINS x CENTRE_BINS counts, rows = y, columns = x;
    - ``concavity_hist``: percent of masks per ``CONCAVITY_EDGES`` bin, each sampled
      mask weighted by (masks in its size bin / sampled masks in that bin), so the
      stratified sample estimates the distribution over all masks;
    - ``concavity_by_size``: (size bin, concavity bin) percent within each size bin;
    - ``concavity_sampled``, ``concavity_size_counts``, ``concavity_sample_counts``;
    - ``predicted_iou_hist``, ``stability_score_hist``: percent per ``SCORE_EDGES`` bin;
    - ``resolutions``: list of (width, height, images) sorted by images, descending;
    - ``table_cpu_s``, ``masks_per_s_per_core``: CPU seconds spent on the per-mask
      table and the resulting throughput per core.
    """
    fs, root = storage.filesystem(str(stats_dir))
    images = _read(fs, storage.join(root, "images.parquet"), IMAGE_SCHEMA,
                   ["width", "height", "num_masks", "covered_fraction"])
    shards = _read(fs, storage.join(root, "shards.parquet"), SHARD_SCHEMA)
    num_masks = images["num_masks"].to_numpy()
    width, height = images["width"].to_numpy(), images["height"].to_numpy()

    n_size_bins = len(SIZE_BIN_EDGES) - 1
    rel_hist = np.zeros(len(REL_SIZE_EDGES) - 1, np.int64)
    centre = np.zeros((CENTRE_BINS, CENTRE_BINS), np.int64)
    iou_hist = np.zeros(len(SCORE_EDGES) - 1, np.int64)
    stab_hist = np.zeros(len(SCORE_EDGES) - 1, np.int64)
    size_counts = np.zeros(n_size_bins, np.int64)
    sample_counts = np.zeros(n_size_bins, np.int64)
    conc_by_size = np.zeros((n_size_bins, len(CONCAVITY_EDGES) - 1), np.int64)
    columns = ["rel_size", "center_x", "center_y", "concavity", "predicted_iou",
               "stability_score"]
    for batch in _batches(fs, storage.join(root, "masks.parquet"), batch_size, columns):
        rel = batch.column("rel_size").to_numpy(zero_copy_only=False)
        rel_hist += np.histogram(rel, REL_SIZE_EDGES)[0]
        cx = batch.column("center_x").to_numpy(zero_copy_only=False)
        cy = batch.column("center_y").to_numpy(zero_copy_only=False)
        centre += np.histogram2d(cy, cx, bins=CENTRE_BINS, range=[[0, 1], [0, 1]])[0].astype(np.int64)
        for name, hist in (("predicted_iou", iou_hist), ("stability_score", stab_hist)):
            values = batch.column(name).to_numpy(zero_copy_only=False)
            hist += np.histogram(np.clip(values, SCORE_EDGES[0], SCORE_EDGES[-1] - 1e-6),
                                 SCORE_EDGES)[0]
        size_bin = np.clip(np.searchsorted(SIZE_BIN_EDGES, rel, side="right") - 1, 0,
                           n_size_bins - 1)
        size_counts += np.bincount(size_bin, minlength=n_size_bins)
        conc = batch.column("concavity").to_numpy(zero_copy_only=False)
        sampled = ~np.isnan(conc)
        sample_counts += np.bincount(size_bin[sampled], minlength=n_size_bins)
        conc_bin = np.clip(np.searchsorted(CONCAVITY_EDGES, conc[sampled], side="right") - 1,
                           0, len(CONCAVITY_EDGES) - 2)
        np.add.at(conc_by_size, (size_bin[sampled], conc_bin), 1)

    weights = np.divide(size_counts, sample_counts, out=np.zeros(n_size_bins),
                        where=sample_counts > 0)
    conc_weighted = (conc_by_size * weights[:, None]).sum(axis=0)
    total_masks = int(rel_hist.sum())
    resolutions, res_counts = (np.unique(np.stack([width, height], 1), axis=0, return_counts=True)
                               if len(width) else (np.zeros((0, 2), int), np.zeros(0, int)))
    order = np.argsort(-res_counts, kind="stable")
    table_cpu = float(shards["table_cpu_s"].to_numpy().sum())
    return {
        "images": int(len(num_masks)),
        "masks": total_masks,
        "shards": int(shards.num_rows),
        "bytes": int(shards["bytes"].to_numpy().sum()),
        "skipped": int(shards["skipped"].to_numpy().sum()),
        "masks_per_image_mean": float(num_masks.mean()) if len(num_masks) else 0.0,
        "masks_per_image_median": float(np.median(num_masks)) if len(num_masks) else 0.0,
        "covered_fraction_mean": float(np.mean(images["covered_fraction"].to_numpy()))
        if len(num_masks) else 0.0,
        "masks_per_image_hist": _percent(np.histogram(num_masks, MASKS_PER_IMAGE_EDGES)[0]),
        "rel_size_hist": _percent(rel_hist),
        "centre_hist": centre,
        "concavity_hist": _percent(conc_weighted),
        "concavity_by_size": np.stack([_percent(row) for row in conc_by_size]),
        "concavity_sampled": int(sample_counts.sum()),
        "concavity_size_counts": size_counts,
        "concavity_sample_counts": sample_counts,
        "predicted_iou_hist": _percent(iou_hist),
        "stability_score_hist": _percent(stab_hist),
        "resolutions": [(int(w), int(h), int(c)) for (w, h), c in
                        zip(resolutions[order], res_counts[order])],
        "table_cpu_s": table_cpu,
        "masks_per_s_per_core": total_masks / table_cpu if table_cpu > 0 else float("nan"),
    }


def _read(fs: Any, path: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """A stats table, or an empty one: a table with no rows is not written (see
    ``pipeline.dataset.tables.TableSink``)."""
    if not fs.exists(path):
        schema = pa.schema([schema.field(c) for c in columns]) if columns else schema
        return schema.empty_table()
    return pq.read_table(path, filesystem=fs, columns=columns)


def _batches(fs: Any, path: str, batch_size: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    if not fs.exists(path):
        return
    with fs.open(path, "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def _percent(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts * (100.0 / total) if total > 0 else np.zeros_like(counts)
