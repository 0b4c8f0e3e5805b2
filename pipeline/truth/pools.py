"""Pools of synthetic scenes written as image folders with their exact truth (a COCO
instances JSON), and ``Truth``: the true masks of such a pool by image source.

What the simulated annotator compares its masks with (``pipeline.annotate.simulated``),
and what the engine's pools are measured against.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from pipeline import storage
from pipeline.truth.synthetic import coco_instances, make_scene, scene_seeds

DONE_FILE = "done.json"


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
                 seed_start: int = 0) -> Path:
    """Held-out synthetic scenes as ``images/scene_<seed>.png`` plus their masks as a COCO
    instances JSON; returns the JSON's path."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    scenes, names = [], []
    for seed in scene_seeds("test", seed_start, count):
        scene = make_scene(seed, size)
        names.append(f"scene_{seed}.png")
        Image.fromarray(scene.image).save(folder / "images" / names[-1])
        scenes.append(scene)
    path = folder / "instances.json"
    path.write_text(json.dumps(coco_instances(scenes, names)))
    return path


def write_pools(root: str, names: Sequence[str], counts: Mapping[str, int], seed_start: int,
                size: tuple[int, int]) -> dict[str, dict[str, str]]:
    """Writes one pool of training-split scenes per name, once (``<root>/<name>/``), with
    its truth (``<root>/<name>.json``) and the truth of the pools so far
    (``<root>/upto_<name>.json``); ``<root>/done.json`` last. Returns, per name, the
    paths: images, truth, upto, image_dir (the root, which upto's file names are under)."""
    pools = {name: {"images": storage.join(root, name), "truth": storage.join(root, f"{name}.json"),
                    "upto": storage.join(root, f"upto_{name}.json"), "image_dir": root} for name in names}
    marker = storage.join(root, DONE_FILE)
    if storage.read_json(marker) is not None:
        return pools
    from PIL import Image

    seed, upto = int(seed_start), {"images": [], "annotations": [], "categories": []}
    for name in names:
        made, files = [], []
        for s in scene_seeds("train", seed, int(counts[name])):
            scene = make_scene(s, size)
            buffer = io.BytesIO()
            Image.fromarray(scene.image).save(buffer, format="PNG")
            storage.write_bytes(storage.join(pools[name]["images"], f"scene_{s}.png"), buffer.getvalue())
            made.append(scene)
            files.append(f"{name}/scene_{s}.png")
        seed += int(counts[name])
        truth = coco_instances(made, files)
        storage.write_json(pools[name]["truth"], truth)
        offset = len(upto["images"])
        upto["images"] += [{**i, "id": i["id"] + offset} for i in truth["images"]]
        upto["annotations"] += [{**a, "id": a["id"] + offset * 1000, "image_id": a["image_id"] + offset}
                                for a in truth["annotations"]]
        upto["categories"] = truth["categories"]
        storage.write_json(pools[name]["upto"], upto)
    storage.write_json(marker, {"seed_start": int(seed_start), "size": list(size),
                                **{n: int(counts[n]) for n in names}})
    return pools
