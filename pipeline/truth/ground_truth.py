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
import logging
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from pipeline import storage
from pipeline.dataset.filters import MaskFilter, is_held_out
from pipeline.dataset.listing import committed_shards
from pipeline.dataset.rle import rle_problem, usable
from pipeline.dataset.shards import Sample, iter_shard
from pipeline.truth.domains import make_domain_scene
from pipeline.truth.synthetic import scene_seeds

log = logging.getLogger(__name__)


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
    drawn at ``size`` (H, W) in ``domain`` (``pipeline.truth.domains``)."""

    def __init__(self, split: str, seed_start: int, count: int, size: Sequence[int], domain: str = "shapes") -> None:
        self.seeds = scene_seeds(split, int(seed_start), int(count))
        self.size = (int(size[0]), int(size[1]))
        self.domain = domain

    def __len__(self) -> int:
        return len(self.seeds)

    def scene(self, index: int) -> GroundTruth:
        seed = self.seeds[index % len(self.seeds)]
        scene = make_domain_scene(self.domain, seed, self.size)
        name = "synthetic" if self.domain == "shapes" else self.domain
        return GroundTruth(f"{name}_{seed}", scene.image, scene.masks)

    def __iter__(self) -> Iterator[GroundTruth]:
        return (self.scene(i) for i in range(len(self)))


class ShardMasks:
    """The images of SA-1B shards with their masks whose predicted IoU and stability
    pass the filters (masks without these fields pass). With ``holdout`` > 0, only the
    images outside that held-out share (``held_out`` False: training) or only those in it
    (``held_out`` True: evaluation), by key (``pipeline.dataset.filters.is_held_out``)."""

    generated = True

    def __init__(self, shards: str | Sequence[str], pred_iou_thresh: float | None = 0.0,
                 stability_score_thresh: float | None = 0.0, holdout: float = 0.0, held_out: bool = False) -> None:
        self.files = committed_shards(shards)
        self.filter = MaskFilter(pred_iou_thresh, stability_score_thresh)
        self.holdout, self.held_out = float(holdout), bool(held_out)

    def records(self, files: Sequence[str] | None = None) -> Iterator[Sample]:
        """The samples of ``files`` (default: all) in this share, read but not decoded."""
        for url in self.files if files is None else files:
            yield from (s for s in iter_shard(url) if is_held_out(s.key, self.holdout) == self.held_out)

    def decode(self, sample: Sample) -> GroundTruth:
        from pycocotools import mask as mask_utils

        image = _rgb(sample.jpg)
        fit, problems = usable(sample.record["annotations"], *image.shape[:2])
        if problems:
            log.warning("%s %s: %d mask(s) left out: %s", sample.shard, sample.key, len(problems),
                        "; ".join(problems[:3]))
        kept = self.filter(fit)
        if kept:
            masks = mask_utils.decode([dict(a["segmentation"]) for a in kept]).transpose(2, 0, 1).astype(bool)
        else:
            masks = _no_masks(image)
        return GroundTruth(sample.key, image, masks, generated=True)

    def __iter__(self) -> Iterator[GroundTruth]:
        return (self.decode(s) for s in self.records())


class CocoInstances:
    """The images and instance masks of a COCO instances JSON, in image-id order; the
    held-out share as ``ShardMasks``'s, by file name without extension."""

    generated = False

    def __init__(self, annotations: str, image_dir: str, holdout: float = 0.0, held_out: bool = False) -> None:
        from pycocotools.coco import COCO

        fs, path = storage.filesystem(annotations)
        if not fs.isfile(path):
            raise FileNotFoundError(f"COCO annotations {annotations!r} do not exist")
        self.coco = COCO()  # built from the JSON read here: pycocotools opens local files only
        self.coco.dataset = json.loads(fs.cat_file(path))
        self.coco.createIndex()
        self.image_dir = image_dir
        self.holdout, self.held_out = float(holdout), bool(held_out)

    def records(self) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """(image info, its non-crowd annotations) per image of this share; no image is read."""
        coco = self.coco
        for image_id in sorted(coco.getImgIds()):
            info = coco.loadImgs(image_id)[0]
            if is_held_out(_stem(info), self.holdout) != self.held_out:
                continue
            anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
            yield info, anns

    def decode(self, record: tuple[dict[str, Any], list[dict[str, Any]]]) -> GroundTruth:
        info, anns = record
        fs, folder = storage.filesystem(self.image_dir)
        image = _rgb(fs.cat_file(storage.join(folder, info["file_name"])))
        h, w = image.shape[:2]
        fit = [a for a in anns if not _is_rle(a) or rle_problem(a["segmentation"], h, w) is None]
        if len(fit) < len(anns):
            log.warning("%s: %d RLE mask(s) of image %s do not fit it; left out", info["file_name"],
                        len(anns) - len(fit), info.get("id"))
        masks = np.stack([self.coco.annToMask(a).astype(bool) for a in fit]) if fit else _no_masks(image)
        return GroundTruth(_stem(info), image, masks)

    def __iter__(self) -> Iterator[GroundTruth]:
        return (self.decode(r) for r in self.records())


def _is_rle(ann: Mapping[str, Any]) -> bool:
    """A compressed RLE segmentation (polygons and uncompressed RLE are pycocotools' to convert)."""
    seg = ann.get("segmentation")
    return isinstance(seg, Mapping) and isinstance(seg.get("counts"), (str, bytes))


def _stem(info: Mapping[str, Any]) -> str:
    return str(info["file_name"]).rsplit(".", 1)[0]


# Held-out sources by the name ``stage.source`` gives (conf/stage/eval.yaml); with
# holdout_fraction > 0, shards and COCO images of that held-out share only.
SOURCES = {
    "synthetic": lambda c: SyntheticScenes("test", c["seed_start"], c["num_images"], c["size"], c["domain"]),
    "shards": lambda c: ShardMasks(c["shards"], c["pred_iou_thresh"], c["stability_score_thresh"],
                                   c["holdout_fraction"], held_out=c["holdout_fraction"] > 0),
    "coco": lambda c: CocoInstances(c["coco"]["annotations"], c["coco"]["image_dir"], c["holdout_fraction"],
                                    held_out=c["holdout_fraction"] > 0),
}


def held_out(eval_cfg: Mapping[str, Any]) -> Iterator[GroundTruth]:
    """The first ``num_images`` images of the source ``eval_cfg["source"]`` names."""
    source = eval_cfg["source"]
    if source not in SOURCES:
        raise ValueError(f"unknown eval source {source!r}: one of {', '.join(SOURCES)}")
    return islice(iter(SOURCES[source](eval_cfg)), int(eval_cfg["num_images"]))
