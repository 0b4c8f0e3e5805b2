"""Throughput of the stats stage's per-mask table, in masks per second per CPU core.

    python benchmarks/stats_throughput.py [--images 100] [--masks-per-image 100]

Builds one shard of SA-1B-sized records (2250x1500 images, irregular blob masks with
log-uniform sizes, like SA-1B's) and measures, with the CPU time of the one thread
doing the work:
- rle:    the per-mask columns from already-parsed records (pycocotools on the RLE);
- table:  a whole shard into the per-mask table: tar read, JSON parse, columns, Arrow
          table (no concavity sample) -- the figure the issue asks for;
- sample: the same with the default concavity sample (64 masks per size bin).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import webdataset as wds
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.stats.tables import image_mask_columns, shard_stats  # noqa: E402

HEIGHT, WIDTH = 1500, 2250


def blob(rng: np.random.Generator) -> np.ndarray:
    """A star-shaped blob with a jagged outline, sqrt(area / image area) log-uniform."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    radius = np.exp(rng.uniform(np.log(4), np.log(700)))
    cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 48))
    r = radius * rng.uniform(0.5, 1.0, 48)
    points = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)
    cv2.fillPoly(mask, [points.astype(np.int32)], 1)
    return mask


def make_records(images: int, masks_per_image: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    # Encoding 3 MP masks is slow; a pool of distinct masks reused under new ids
    # costs the stats code exactly as much as distinct ones.
    pool = []
    for _ in tqdm(range(min(300, images * masks_per_image)), desc="mask pool"):
        m = blob(rng)
        if not m.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(m))
        x, y, w, h = mask_utils.toBbox(rle).tolist()
        pool.append({"segmentation": {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode()},
                     "bbox": [x, y, w - 1, h - 1], "area": int(mask_utils.area(rle)),
                     "crop_box": [0, 0, WIDTH, HEIGHT]})
    records = []
    for i in range(images):
        anns = []
        for j, k in enumerate(rng.integers(0, len(pool), masks_per_image)):
            ann = dict(pool[k], id=i * 1_000_000 + j, predicted_iou=float(rng.uniform(0.88, 1.0)),
                       stability_score=float(rng.uniform(0.95, 1.0)),
                       point_coords=[[float(rng.uniform(0, WIDTH)), float(rng.uniform(0, HEIGHT))]])
            anns.append(ann)
        records.append({"image": {"image_id": i, "width": WIDTH, "height": HEIGHT,
                                  "file_name": f"sa_{i}.jpg"}, "annotations": anns})
    return records


def cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--masks-per-image", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    records = make_records(args.images, args.masks_per_image)
    masks = sum(len(r["annotations"]) for r in records)
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "sa_000000.tar"
        jpg = cv2.imencode(".jpg", np.zeros((HEIGHT, WIDTH, 3), np.uint8))[1].tobytes()
        with wds.TarWriter(str(shard)) as sink:
            for r in records:
                sink.write({"__key__": f"sa_{r['image']['image_id']}", "jpg": jpg,
                            "json": json.dumps(r).encode()})
        json_mb = sum(len(json.dumps(r)) for r in records) / 1e6
        counts_len = np.mean([len(a["segmentation"]["counts"]) for r in records
                              for a in r["annotations"]])
        results = {
            "rle": cpu_seconds(lambda: [image_mask_columns(r) for r in records], args.repeats),
            "table": cpu_seconds(lambda: shard_stats(str(shard), concavity_per_bin=0), args.repeats),
            "sample": cpu_seconds(lambda: shard_stats(str(shard), concavity_per_bin=64), 1),
        }
    print(f"{args.images} images x {args.masks_per_image} masks = {masks} masks, "
          f"{WIDTH}x{HEIGHT}, {json_mb:.1f} MB of JSON, RLE strings of {counts_len:.0f} chars on average")
    for name, seconds in results.items():
        print(f"{name:>7}: {masks / seconds:>10,.0f} masks/s per core ({seconds:.3f} CPU s)")
    print("command: python benchmarks/stats_throughput.py "
          f"--images {args.images} --masks-per-image {args.masks_per_image}")


if __name__ == "__main__":
    main()
