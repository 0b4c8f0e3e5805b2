"""export_yolo end to end, read back by ultralytics' own dataset loader (``YOLODataset``,
which checks every image/label pair as training does): every mask that has a polygon
comes back as one, its filled outline within IoU 0.9 of the mask (holes filled), and
what a polygon cannot hold is counted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import yaml
from scipy import ndimage

from pipeline.stages import run_stage

from .dataset_factory import compose, make_dataset

# ultralytics patches PIL.Image.open on import (and would fetch a HEIF plugin for a file
# Pillow cannot read): its reader runs in a subprocess, so no other test sees the patch.
READER = """
import json, os, sys
from ultralytics.data.dataset import YOLODataset
from ultralytics.data.utils import check_det_dataset
data_yaml = sys.argv[1]
resolved = check_det_dataset(data_yaml, autodownload=False)
loaded = YOLODataset(img_path=str(resolved["train"]), data={"names": resolved["names"], "channels": 3},
                     task="segment", augment=False, imgsz=128)
print(json.dumps({"train": str(resolved["train"]), "names": {str(k): v for k, v in resolved["names"].items()},
                  "labels": [{"key": os.path.basename(lb["im_file"])[: -len(".jpg")], "shape": list(lb["shape"]),
                              "cls": lb["cls"].ravel().tolist(), "segments": [s.tolist() for s in lb["segments"]]}
                             for lb in loaded.labels]}))
"""


def ultralytics_read(data_yaml: Path, cwd: Path) -> dict:
    """What ultralytics' own loader makes of ``data_yaml``, run from ``cwd``."""
    env = {**os.environ, "YOLO_CONFIG_DIR": str(cwd / ".ultralytics"), "YOLO_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", READER, str(data_yaml)], capture_output=True, text=True, cwd=cwd,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_yolo_export_reads_back_in_ultralytics(tmp_path):
    dataset = make_dataset(tmp_path / "dataset", num_shards=2, images_per_shard=3, sizes=((96, 128), (80, 112)))
    summary = run_stage(compose("export_yolo", dataset.root, tmp_path / "out"))
    folder = tmp_path / "out" / "yolo"
    spec = yaml.safe_load((folder / "data.yaml").read_text())
    assert spec["names"] == {0: "object"} and summary["images"] == len(dataset.samples) == 6

    # data.yaml as `yolo segment train data=...` reads it, from another folder than its own.
    read = ultralytics_read(folder / "data.yaml", tmp_path / "dataset")
    assert Path(read["train"]) == folder / "images" and read["names"] == {"0": "object"}
    labels = {lb["key"]: lb for lb in read["labels"]}
    assert set(labels) == {s.key for s in dataset.samples}

    with_polygon = too_small = holes = parts = 0
    for sample in dataset.samples:
        h, w = sample.image.shape[:2]
        label = labels[sample.key]
        assert label["shape"] == [h, w]
        drawn = []
        for segment in label["segments"]:
            canvas = np.zeros((h, w), np.uint8)
            cv2.fillPoly(canvas, [np.round(np.asarray(segment) * [w, h]).astype(np.int32)], 1)
            drawn.append(canvas.astype(bool))
        assert len(drawn) == len(label["cls"]) and set(label["cls"]) <= {0}
        for mask in sample.masks:
            mask = mask.astype(bool)
            _, count = ndimage.label(mask, structure=np.ones((3, 3)))
            filled = ndimage.binary_fill_holes(mask)
            holes += bool((filled & ~mask).any())
            parts += count > 1
            if mask.sum() < 3 or (mask.sum() < 6 and count > 1):
                continue  # a pixel or two: no polygon of 3 vertices
            with_polygon += 1
            if mask.sum() >= 40:
                best = max(((d & filled).sum() / (d | filled).sum() for d in drawn), default=0)
                assert best >= 0.9, (sample.key, best)
        too_small += sum(m.sum() < 3 for m in sample.masks)
    assert summary["masks"] == sum(len(lb["segments"]) for lb in labels.values()) >= with_polygon - 2
    assert summary["too_small"] >= too_small > 0
    assert summary["holes_filled"] >= holes > 0 and summary["multi_part"] >= parts > 0
    assert summary["masks"] + summary["too_small"] == sum(len(s.masks) for s in dataset.samples)


def test_categories_become_classes(tmp_path):
    from pipeline.dataset.listing import write_categories

    dataset = make_dataset(tmp_path / "dataset", num_shards=1, images_per_shard=2, masks_per_image=(3, 2))
    write_categories(str(dataset.root), [{"id": 7, "name": "cat", "supercategory": "animal"},
                                         {"id": 3, "name": "dog", "supercategory": "animal"}])
    summary = run_stage(compose("export_yolo", dataset.root, tmp_path / "out"))
    # The factory's masks carry no category: class "object", after the dataset's own.
    names = yaml.safe_load((tmp_path / "out" / "yolo" / "data.yaml").read_text())["names"]
    assert names == {0: "dog", 1: "cat", 2: "object"}
    assert summary["images"] == 2 and summary["unlabeled"] == summary["masks"] == 5
    lines = (tmp_path / "out" / "yolo" / "labels").glob("*.txt")
    assert {line.split()[0] for f in lines for line in f.read_text().splitlines()} == {"2"}


def test_a_dot_inside_a_ring_is_inside_the_filled_outline():
    """An island inside a hole is inside the filled outline (not bridged in, where an
    even-odd fill would turn it into a hole)."""
    from pipeline.dataset.yolo import mask_polygon

    mask = np.zeros((60, 60), bool)
    yy, xx = np.mgrid[:60, :60]
    r = np.hypot(yy - 30, xx - 30)
    mask[(r >= 15) & (r <= 25)] = True
    mask[(abs(yy - 30) <= 3) & (abs(xx - 30) <= 3)] = True
    polygon, holes, parts = mask_polygon(mask)
    assert holes and not parts
    drawn = np.zeros((60, 60), np.uint8)
    cv2.fillPoly(drawn, [np.round(polygon).astype(np.int32)], 1)
    assert drawn[30, 30] == 1 and drawn[30, 10] == 1 and drawn[30, 20] == 1  # dot, ring, filled hole
