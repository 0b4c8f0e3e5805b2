"""Pools of images written as folders with their exact truth (a COCO instances JSON), and
``Truth``: the true masks of such a pool by image source.

What the simulated annotator compares its masks with (``pipeline.annotate.simulated``),
what the engine's pools are measured against, and the held-out sets its models are
evaluated and gated on. Images come from a domain's procedural scenes
(``pipeline.truth.domains``: training seeds for pools, test seeds for held-out sets)
or from a COCO set with masks (real images: its images in id order, the first ones to
the pools, the next ones held out).
"""
from __future__ import annotations

import io
import json
import os
import posixpath
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from pipeline import storage
from pipeline.truth.domains import make_domain_scene
from pipeline.truth.synthetic import Scene, coco_instances, scene_seeds

DONE_FILE = "done.json"
HELD_OUT = "held_out"


class Truth:
    """The true masks of the images of a COCO instances JSON, looked up by an image's
    source (a path, or ``<tar>#<member>``) through its file name."""

    def __init__(self, annotations: str | os.PathLike):
        data = json.loads(Path(annotations).read_text())
        self._by_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                self._by_image.setdefault(ann["image_id"], []).append(ann)
        self._images = {posixpath.basename(img["file_name"]): img for img in data["images"]}

    def __call__(self, source: str) -> np.ndarray | None:
        """N x H x W bool masks of the image ``source`` names, or None for an unknown one."""
        info = self._images.get(posixpath.basename(source.split("#")[-1]))
        if info is None:
            return None
        h, w = info["height"], info["width"]
        masks = []
        for ann in self._by_image.get(info["id"], []):
            seg = ann["segmentation"]
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) or isinstance(seg["counts"], list) else seg
            rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
            masks.append(mask_utils.decode(rle).astype(bool))
        return np.stack(masks) if masks else np.zeros((0, h, w), bool)


def write_scenes(folder: str | os.PathLike, count: int, size: tuple[int, int] = (512, 512),
                 seed_start: int = 0, domain: str = "shapes") -> Path:
    """Held-out scenes of ``domain`` as ``images/scene_<seed>.png`` plus their masks as a
    COCO instances JSON; returns the JSON's path."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    scenes, names = [], []
    for seed in scene_seeds("test", seed_start, count):
        scene = make_domain_scene(domain, seed, size)
        names.append(f"scene_{seed}.png")
        Image.fromarray(scene.image).save(folder / "images" / names[-1])
        scenes.append(scene)
    path = folder / "instances.json"
    path.write_text(json.dumps(coco_instances(scenes, names)))
    return path


def _synthetic(source: Mapping[str, Any], split: str, start: int, count: int) -> Iterator[tuple[str, Scene]]:
    """Scenes of the training split from ``seed_start`` + ``start``, or of the test split
    from its first seed (the held-out scenes eval measures by default)."""
    size = tuple(int(v) for v in source["size"])
    first = int(source["seed_start"]) + start if split == "train" else start
    for seed in scene_seeds(split, first, count):
        yield f"scene_{seed}.png", make_domain_scene(source["domain"], seed, size)


def _coco(source: Mapping[str, Any], start: int, count: int) -> Iterator[tuple[str, Scene]]:
    from pipeline.truth.ground_truth import CocoInstances

    coco = CocoInstances(source["coco"]["annotations"], source["coco"]["image_dir"])
    records = list(coco.records())
    if start + count > len(records):
        raise ValueError(f"the COCO set {source['coco']['annotations']} has {len(records)} images with masks; "
                         f"the pools and the held-out set need {start + count}")
    for record in records[start:start + count]:
        gt = coco.decode(record)
        masks = gt.masks[gt.masks.reshape(len(gt.masks), -1).any(1)] if len(gt.masks) else gt.masks
        scene = Scene(image=gt.image, masks=masks, kinds=["object"] * len(masks),
                      parents=np.full(len(masks), -1, np.int64), seed=int(record[0]["id"]))
        yield f"{gt.key}.png", scene


def write_pools(root: str, pools: Sequence[tuple[str, int]], source: Mapping[str, Any],
                held_out: int) -> dict[str, dict[str, str]]:
    """Writes each pool (name, image count) once, in order, as ``<root>/<name>/`` with its
    truth (``<root>/<name>.json``) and the truth of the pools so far
    (``<root>/upto_<name>.json``, whose file names are relative to ``root``), then a
    held-out set of ``held_out`` images (``<root>/held_out/``, ``held_out.json``);
    ``<root>/done.json`` last.

    ``source``: ``{"domain", "seed_start", "size"}`` (procedural scenes; ``coco`` with a
    null annotations) or ``{"coco": {"annotations", "image_dir"}}`` (a COCO set).
    Returns, per pool name and for ``held_out``: images, truth, upto, image_dir.
    """
    names = [name for name, _ in pools] + [HELD_OUT]
    paths = {name: {"images": storage.join(root, name), "truth": storage.join(root, f"{name}.json"),
                    "upto": storage.join(root, f"upto_{name}.json"), "image_dir": root} for name in names}
    if storage.read_json(storage.join(root, DONE_FILE)) is not None:
        return paths
    from PIL import Image

    coco = (source.get("coco") or {}).get("annotations")
    total = sum(count for _, count in pools)
    upto: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    start = 0
    for name, count in [*pools, (HELD_OUT, held_out)]:
        if coco:
            found = _coco(source, start, count)
        elif name == HELD_OUT:
            found = _synthetic(source, "test", 0, count)
        else:
            found = _synthetic(source, "train", start, count)
        made, files = [], []
        for file_name, scene in found:
            buffer = io.BytesIO()
            Image.fromarray(scene.image).save(buffer, format="PNG")
            storage.write_bytes(storage.join(paths[name]["images"], file_name), buffer.getvalue())
            made.append(scene)
            files.append(f"{name}/{file_name}")
        start += count
        truth = coco_instances(made, files)
        storage.write_json(paths[name]["truth"], truth)
        if name != HELD_OUT:
            offset = len(upto["images"])
            upto["images"] += [{**i, "id": i["id"] + offset} for i in truth["images"]]
            upto["annotations"] += [{**a, "id": a["id"] + offset * 1000, "image_id": a["image_id"] + offset}
                                    for a in truth["annotations"]]
            upto["categories"] = truth["categories"]
            storage.write_json(paths[name]["upto"], upto)
    storage.write_json(storage.join(root, DONE_FILE), {"source": dict(source), "pools": [list(p) for p in pools],
                                                       "held_out": held_out, "images": total + held_out})
    return paths
