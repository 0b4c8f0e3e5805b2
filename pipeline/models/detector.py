"""The box detector of the semi-automatic stage: a torchvision Faster R-CNN with one
"object" class, trained on the boxes of the masks collected so far (SAM paper: a
class-agnostic Faster R-CNN trained on the first stage's masks pre-fills confident
objects, so annotators only add the missing ones).

This module holds the model (build, load, predict), its data (boxes of datasets'
masks and of synthetic scenes) and its held-out box AP (pycocotools, class-agnostic).
Training with Ray Train is ``pipeline.training.detector``.

Architectures (``settings["arch"]``):
- ``fasterrcnn_mobilenet_v3_large_320_fpn``: trains from scratch on a CPU in minutes;
- ``fasterrcnn_resnet50_fpn``: the paper's detector; with ``backbone_weights`` (a path to
  an ImageNet ResNet-50 state dict, read with ``weights_only=True``) its backbone starts
  from them with frozen batch norm, as torchvision does with its own weights.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.dataset.shards import Sample
from pipeline.models import registry

ARCHS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn")
MODEL_FILE = registry.MODEL_FILE  # the detector's state dict
META_FILE = "detector.json"   # what rebuilds it: {"model": settings, "version": ...}
NUM_CLASSES = 2  # background + "object"
OBJECT = 1


# -------------------------------------------------------------------------------- model
def build_detector(settings: Mapping[str, Any], load_backbone: bool = True) -> torch.nn.Module:
    """The detector of ``settings`` (conf/stage/detector.yaml ``model``): arch, min_size,
    max_size, detections_per_image, backbone_weights, trainable_backbone_layers.

    ``load_backbone`` False builds the same network without reading the backbone file
    (a registered detector's state dict holds every weight).
    """
    arch = settings["arch"]
    if arch not in ARCHS:
        raise ValueError(f"unknown detector arch {arch!r}; known: {', '.join(ARCHS)}")
    kwargs = dict(min_size=int(settings["min_size"]), max_size=int(settings["max_size"]),
                  box_detections_per_img=int(settings["detections_per_image"]))
    weights = settings.get("backbone_weights")
    if weights is None:
        builder = getattr(torchvision.models.detection, arch)
        return builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **kwargs)
    if arch != "fasterrcnn_resnet50_fpn":
        raise ValueError(f"backbone_weights is supported with fasterrcnn_resnet50_fpn, not {arch}")
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    # torchvision's own recipe for a backbone with ImageNet weights: frozen batch norm,
    # the last `trainable_backbone_layers` of the five stages trained.
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   trainable_layers=int(settings.get("trainable_backbone_layers", 3)))
    if load_backbone:
        _load_backbone(backbone.body, str(weights))
    return torchvision.models.detection.FasterRCNN(backbone, num_classes=NUM_CLASSES, **kwargs)


def _load_backbone(body: torch.nn.Module, path: str) -> None:
    """A ResNet-50 classification state dict (torchvision's layout) into the FPN body."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"backbone weights {path} do not exist") from None
    except Exception as err:
        raise ValueError(f"backbone weights {path}: not a readable state dict of tensors "
                         f"(loaded with weights_only=True): {type(err).__name__}: {err}") from None
    if not isinstance(state, dict):
        raise ValueError(f"backbone weights {path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"backbone weights {path} do not fit a torchvision ResNet-50: "
                         f"{str(err).splitlines()[1].strip()} ...") from None
    if missing or unexpected:
        raise ValueError(f"backbone weights {path} do not fit a torchvision ResNet-50: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_state(model: torch.nn.Module, data: bytes, name: str) -> None:
    """Loads a detector state dict from ``data`` strictly, with ``weights_only=True``."""
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"detector {name} does not fit its configured arch: "
                         f"{str(err).splitlines()[1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"detector {name} does not fit its configured arch: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def detector_identity(path: str | None) -> str | None:
    """The sha256 identifying the registered detector at ``path`` (model.pth and
    detector.json), or None."""
    if path is None:
        return None
    return registry.identity(registry.read_files(str(path), (MODEL_FILE, META_FILE), "detector"))


def load_detector(path: str, device: str | torch.device = "cpu",
                  expected_sha256: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode on ``device``, its detector.json) of the detector registered
    at ``path`` (its folder or a file in it); ``expected_sha256``: refuse other files."""
    files = registry.read_files(str(path), (MODEL_FILE, META_FILE), "detector")
    registry.check_identity(files, expected_sha256, str(path))
    meta = json.loads(files[META_FILE])
    model = build_detector(meta["model"], load_backbone=False)
    load_state(model, files[MODEL_FILE], str(path))
    return model.to(device).eval(), meta


@torch.no_grad()
def predict(model: torch.nn.Module, images: Sequence[np.ndarray], device: torch.device,
            min_score: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes N x 4 XYXY float32 in image pixels, scores N, descending) per HxWx3 image."""
    model.eval()
    outputs = model([to_tensor(im).to(device) for im in images])
    results = []
    for out in outputs:
        keep = out["scores"] >= min_score
        results.append((out["boxes"][keep].cpu().numpy().astype(np.float32), out["scores"][keep].cpu().numpy()))
    return results


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [0, 1], what torchvision detectors take."""
    return torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1).float().div_(255)  # a copy: PIL's is read-only


# --------------------------------------------------------------------------------- data
@dataclass
class BoxSample:
    """One image and its object boxes: key, image (HxWx3 uint8), boxes (N x 4 float32
    XYXY, exclusive right/bottom edges as COCO's XYWH gives them)."""

    key: str
    image: np.ndarray
    boxes: np.ndarray


def boxes_from_record(record: Mapping[str, Any], min_area: float) -> np.ndarray:
    """XYXY boxes of an SA-1B record's annotations (from their XYWH ``bbox``, or from
    the mask when a record has none) with at least ``min_area`` pixels of box."""
    boxes = []
    for ann in record.get("annotations", []):
        bbox = ann.get("bbox")
        if bbox is None:
            bbox = mask_utils.toBbox({**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}).tolist()
        x, y, w, h = (float(v) for v in bbox)
        if w * h >= min_area and w > 0 and h > 0:
            boxes.append((x, y, x + w, y + h))
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def from_sample(sample: Sample, min_area: float) -> BoxSample:
    """A shard sample as a BoxSample (its JPEG decoded)."""
    with Image.open(io.BytesIO(sample.jpg)) as im:
        image = np.asarray(im.convert("RGB"))
    return BoxSample(sample.key, image, boxes_from_record(sample.record, min_area))


def from_scene(scene: Any, min_area: float) -> BoxSample:
    """A synthetic scene (``pipeline.truth.synthetic.Scene``) as a BoxSample."""
    boxes = scene.boxes_xyxy()
    boxes[:, 2:] += 1  # inclusive pixel bounds -> exclusive edges, as COCO's XYWH
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return BoxSample(f"synthetic_{scene.seed}", scene.image, boxes[area >= min_area])


def flip(sample: BoxSample) -> BoxSample:
    """The horizontally mirrored sample (the usual detection augmentation)."""
    w = sample.image.shape[1]
    boxes = sample.boxes.copy()
    boxes[:, [0, 2]] = w - sample.boxes[:, [2, 0]]
    return BoxSample(sample.key, np.ascontiguousarray(sample.image[:, ::-1]), boxes)


def target(sample: BoxSample, device: torch.device) -> dict[str, torch.Tensor]:
    boxes = torch.as_tensor(sample.boxes, dtype=torch.float32, device=device).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.full((len(boxes),), OBJECT, dtype=torch.int64, device=device)}


# ----------------------------------------------------------------------------- box AP
def box_ap(model: torch.nn.Module, samples: Iterable[BoxSample], device: torch.device,
           batch_size: int = 4) -> dict[str, float]:
    """Class-agnostic COCO box AP of ``model`` on ``samples`` (pycocotools COCOeval).

    Returns: images, boxes (ground truth), detections, box_ap (AP@[.5:.95]), box_ap50,
    box_ap75, box_ap_small, box_ap_medium, box_ap_large, box_ar100 (-1 where COCOeval
    has no ground truth in a size range).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for batch in _batches(samples, batch_size):
        for sample, (boxes, scores) in zip(batch, predict(model, [s.image for s in batch], device)):
            image_id = len(images) + 1
            h, w = sample.image.shape[:2]
            images.append({"id": image_id, "width": w, "height": h, "file_name": sample.key})
            for b in sample.boxes:
                bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": OBJECT,
                                    "bbox": [float(b[0]), float(b[1]), bw, bh], "area": bw * bh, "iscrowd": 0})
            for b, s in zip(boxes, scores):
                detections.append({"image_id": image_id, "category_id": OBJECT, "score": float(s),
                                   "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    if not images:
        raise ValueError("box AP needs at least one held-out image")
    names = ("box_ap", "box_ap50", "box_ap75", "box_ap_small", "box_ap_medium", "box_ap_large")
    result = {"images": len(images), "boxes": len(annotations), "detections": len(detections)}
    if not annotations or not detections:  # COCOeval cannot run; nothing found is AP 0
        return {**result, **{k: 0.0 if annotations else -1.0 for k in (*names, "box_ar100")}}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": OBJECT, "name": "object"}]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        evaluator.params.useCats = 0  # class-agnostic
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {**result, **{k: float(stats[i]) for i, k in enumerate(names)}, "box_ar100": float(stats[8])}


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch

