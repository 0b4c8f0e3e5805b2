"""Images with instance masks, from each kind of source: what retrain trains on and
eval measures against.

One small class per kind, chosen by name from the config (``SOURCES``):

- ``synthetic``: procedural scenes with exact masks (``pipeline.truth.synthetic``), scene
  ``i`` of a seed split, so training and held-out scenes never overlap;
- ``shards``: SA-1B shards (this project's datasets or SA-1B downloads), with the masks
  that pass quality filters on predicted IoU and stability;
- ``coco``: a COCO instances JSON and its image folder (crowd regions skipped).

Shards and COCO split reading from decoding (``records`` then ``decode``) so that a
resumed training run can skip what it consumed before without decoding it. Every path
may be a local path or an fsspec URL.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from pipeline import storage
from pipeline.dataset.filters import MaskFilter
from pipeline.dataset.listing import committed_shards
from pipeline.dataset.shards import Sample, iter_shard
from pipeline.truth.synthetic import make_scene, scene_seeds


@dataclass
class GroundTruth:
    """One image with instance masks, from any source.

    key: a unique name; image: HxWx3 uint8 RGB; masks: NxHxW bool; generated: the masks
    were made by a model (SA-1B-format shards), not by people or the scene generator.
    """

    key: str
    image: np.ndarray
    masks: np.ndarray
    generated: bool = False


def _rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _no_masks(image: np.ndarray) -> np.ndarray:
    return np.zeros((0, *image.shape[:2]), bool)


class SyntheticScenes:
    """Scene ``i`` (0 <= i < count, wrapping) of the ``split`` seeds from ``seed_start``,
    drawn at ``size`` (H, W)."""

    def __init__(self, split: str, seed_start: int, count: int, size: Sequence[int]) -> None:
        self.seeds = scene_seeds(split, int(seed_start), int(count))
        self.size = (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.seeds)

    def scene(self, index: int) -> GroundTruth:
        seed = self.seeds[index % len(self.seeds)]
        scene = make_scene(seed, self.size)
        return GroundTruth(f"synthetic_{seed}", scene.image, scene.masks)

    def __iter__(self) -> Iterator[GroundTruth]:
        return (self.scene(i) for i in range(len(self)))


class ShardMasks:
    """The images of SA-1B shards with their masks whose predicted IoU and stability
    pass the filters (masks without these fields pass)."""

    generated = True

    def __init__(self, shards: str | Sequence[str], pred_iou_thresh: float = 0.0,
                 stability_score_thresh: float = 0.0) -> None:
        self.files = committed_shards(shards)
        self.filter = MaskFilter(float(pred_iou_thresh), float(stability_score_thresh))

    def records(self, files: Sequence[str] | None = None) -> Iterator[Sample]:
        """The samples of ``files`` (default: all), read but not decoded."""
        for url in self.files if files is None else files:
            yield from iter_shard(url)

    def decode(self, sample: Sample) -> GroundTruth:
        from pycocotools import mask as mask_utils

        kept = self.filter(sample.record["annotations"])
        image = _rgb(sample.jpg)
        if kept:
            masks = mask_utils.decode([dict(a["segmentation"]) for a in kept]).transpose(2, 0, 1).astype(bool)
        else:
            masks = _no_masks(image)
        return GroundTruth(sample.key, image, masks, generated=True)

    def __iter__(self) -> Iterator[GroundTruth]:
        return (self.decode(s) for s in self.records())


class CocoInstances:
    """The images and instance masks of a COCO instances JSON, in image-id order."""

    generated = False

    def __init__(self, annotations: str, image_dir: str) -> None:
        from pycocotools.coco import COCO

        fs, path = storage.filesystem(annotations)
        if not fs.isfile(path):
            raise FileNotFoundError(f"COCO annotations {annotations!r} do not exist")
        self.coco = COCO()  # built from the JSON read here: pycocotools opens local files only
        self.coco.dataset = json.loads(fs.cat_file(path))
        self.coco.createIndex()
        self.image_dir = image_dir

    def records(self) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """(image info, its non-crowd annotations) per image; no image is read."""
        coco = self.coco
        for image_id in sorted(coco.getImgIds()):
            anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
            yield coco.loadImgs(image_id)[0], anns

    def decode(self, record: tuple[dict[str, Any], list[dict[str, Any]]]) -> GroundTruth:
        info, anns = record
        fs, folder = storage.filesystem(self.image_dir)
        image = _rgb(fs.cat_file(storage.join(folder, info["file_name"])))
        masks = np.stack([self.coco.annToMask(a).astype(bool) for a in anns]) if anns else _no_masks(image)
        return GroundTruth(str(info["file_name"]).rsplit(".", 1)[0], image, masks)

    def __iter__(self) -> Iterator[GroundTruth]:
        return (self.decode(r) for r in self.records())


# Held-out sources by the name ``stage.source`` gives (conf/stage/eval.yaml).
SOURCES = {
    "synthetic": lambda c: SyntheticScenes("test", c["seed_start"], c["num_images"], c["size"]),
    "shards": lambda c: ShardMasks(c["shards"], c["pred_iou_thresh"], c["stability_score_thresh"]),
    "coco": lambda c: CocoInstances(c["coco"]["annotations"], c["coco"]["image_dir"]),
}


def held_out(eval_cfg: Mapping[str, Any]) -> Iterator[GroundTruth]:
    """The first ``num_images`` images of the source ``eval_cfg["source"]`` names."""
    source = eval_cfg["source"]
    if source not in SOURCES:
        raise ValueError(f"unknown eval source {source!r}: one of {', '.join(SOURCES)}")
    return islice(iter(SOURCES[source](eval_cfg)), int(eval_cfg["num_images"]))
