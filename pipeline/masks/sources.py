"""Where a worker's masks come from: a mask source, chosen by name from an allow-list.

A mask source is built once per worker (it loads the model) and called once per image:
``source(item, image) -> list of mask records``. A record has the keys of the automatic
mask generator's ``coco_rle`` output (segmentation, area, bbox, predicted_iou,
stability_score, crop_box, point_coords); any further keys (a category, a detector
score, a provenance) are stored with the mask in the SA-1B record as they are.

A source that makes a new image (augment: objects pasted onto a background) returns
``Rewritten(masks, image)``; the worker stores that image instead of the input's.

The worker around it (pipeline.execution.worker) owns everything else: reading and decoding,
the shard, the manifest, retries and exactly-once commits, so a new way of prompting
the model is one small class here and an entry in SOURCES.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Mapping

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.dataset.filters import MaskFilter
from pipeline.dataset.rle import rle_problem
from pipeline.inputs import box_files
from pipeline.inputs.entries import Item
from pipeline.inputs.images import PreparedImage
from pipeline.masks import paste
from pipeline.masks.records import MaskSource, mask_record, xywh
from pipeline.models import loader as model

log = logging.getLogger(__name__)


class GridSource:
    """SAM's fully automatic generation: point prompts (the grid, or with
    ``amg.prompting=adaptive|objects`` only where nothing is found yet, after a detector's
    boxes), filters and NMS, then, with ``amg.verifier``, only the masks the mask verifier
    accepts (each with its ``verifier_score``), at its registered threshold or the one for
    ``amg.verifier_precision``.

    spec keys: ``model`` (cfg.model), ``amg`` (cfg.amg), ``model_sha256``,
    ``verifier_sha256`` (the verifier's identity the run recorded; its files are checked)
    and, for prompting=objects, ``detector_sha256`` (likewise, for ``amg.objects.detector``)
    or ``output`` (whose ``boxes.parquet`` holds ``amg.objects.boxes``'s rows by entry name).
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        amg = model.plain(spec["amg"])
        self.objects = amg.get("objects") if amg.get("prompting") == "objects" else None
        self.generator = model.build_generator(spec["model"], spec["amg"], spec.get("model_sha256"),
                                               with_boxes=self.objects is not None)
        self.detector = self.box_rows = None
        if self.objects is not None and self.objects.get("detector"):
            from pipeline.models.detector import load_detector

            self.detector, _ = load_detector(self.objects["detector"], self.generator.predictor.device,
                                             spec.get("detector_sha256"))
        elif self.objects is not None:
            self.box_rows = box_files.read_table(spec["output"])
        self.verify = _verifier(spec)

    def __call__(self, item: Item, image: PreparedImage) -> list[dict[str, Any]]:
        if self.objects is None:
            return self.verify(self.generator.generate(image.rgb), image.rgb)
        boxes, categories = self._boxes(item, image)
        records = self.generator.generate(image.rgb, boxes=boxes)
        if categories:  # a box file's categories follow its boxes' masks (as box_prompts)
            by_box = {tuple(np.round(xywh(box), 3)): c for box, c in zip(boxes, categories) if c is not None}
            for record in records:
                category = by_box.get(tuple(np.round(record.get("prompt_box", ()), 3)))
                if category is not None:
                    record["category_id"] = category
        return self.verify(records, image.rgb)

    def _boxes(self, item: Item, image: PreparedImage) -> tuple[np.ndarray, list[int | None]]:
        """The image's box prompts, XYXY in the stored image, and their categories: the
        detector's most confident (``max_boxes``; no categories), or every row the box file
        has for this image (none: adaptive points only)."""
        if self.detector is not None:
            from pipeline.models.detector import predict

            (boxes, _), = predict(self.detector, [image.rgb], self.generator.predictor.device,
                                  float(self.objects["min_box_score"]))
            return boxes[: int(self.objects["max_boxes"])], []  # highest scores first
        rows = [r for r in self.box_rows.get(item.name, []) if r["x0"] is not None]
        size = (image.width, image.height)
        boxes = np.array([box_files.stored_boxes(r, image.original_size, image.orientation, size,
                                                 self.objects.get("box_frame", "auto")) for r in rows]).reshape(-1, 4)
        return boxes, [r.get("category_id") for r in rows]


def _verifier(spec: Mapping[str, Any]) -> Callable[[list[dict[str, Any]], np.ndarray], list[dict[str, Any]]]:
    """The filter of ``spec["amg"]["verifier"]`` (records, rgb) -> the records it accepts,
    each with its ``verifier_score``; all records when no verifier is configured."""
    amg = model.plain(spec.get("amg"))
    if not amg.get("verifier"):
        return lambda records, rgb: records
    from pipeline.models.verifier import load_verifier

    verifier = load_verifier(amg["verifier"], spec.get("verifier_sha256"))
    threshold = verifier.threshold_for(amg.get("verifier_precision"))
    return lambda records, rgb: verifier.keep(records, rgb, threshold)


class DetectorSource:
    """The semi-automatic stage's pre-fill: a box detector's confident boxes as SAM
    prompts (one image embedding, all boxes in one decoder batch), and of their masks
    only the confident ones, each marked ``"provenance": "automatic"`` for the
    annotators to accept, edit or delete; then the mask verifier, if ``amg.verifier``.

    spec keys: ``model``, ``model_sha256``, ``detector`` (a registered detector folder,
    ``pipeline.models.detector``), ``detector_sha256``, ``prompt`` (conf/stage/semi_auto.yaml:
    min_box_score, max_boxes, multimask_output, boxes_per_batch, stability_score_offset,
    pred_iou_thresh, stability_score_thresh), and optionally ``amg`` and ``verifier_sha256``.
    Records carry, besides SA-1B's keys: score (the detector's), prompt_box (XYWH) and
    provenance.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        from pipeline.models.detector import load_detector
        from sam_core import SamPredictor

        self.predictor = SamPredictor(model.load_sam(spec["model"], spec.get("model_sha256")))
        self.detector, _ = load_detector(spec["detector"], self.predictor.device, spec.get("detector_sha256"))
        self.prompt = dict(spec["prompt"])
        self.verify = _verifier(spec)

    def __call__(self, item: Item, image: PreparedImage) -> list[dict[str, Any]]:
        from pipeline.models.detector import predict
        from sam_core.box_prompts import predict_boxes

        p = self.prompt
        (boxes, scores), = predict(self.detector, [image.rgb], self.predictor.device, float(p["min_box_score"]))
        boxes, scores = boxes[: int(p["max_boxes"])], scores[: int(p["max_boxes"])]  # highest scores first
        if not len(boxes):
            return []
        self.predictor.set_image(image.rgb)
        answer = predict_boxes(self.predictor, boxes, multimask_output=bool(p["multimask_output"]),
                               boxes_per_batch=p["boxes_per_batch"],
                               stability_score_offset=float(p["stability_score_offset"]))
        records, confident = [], MaskFilter.of(p)
        for i in range(len(boxes)):
            if answer.areas[i] == 0 or not confident.keeps(answer.predicted_iou[i], answer.stability_score[i]):
                continue  # not confident: left for the annotators to draw
            records.append(mask_record(answer.rles[i], answer.predicted_iou[i], answer.stability_score[i],
                                       (image.width, image.height), score=float(scores[i]),
                                       prompt_box=xywh(boxes[i]), provenance="automatic"))
        return self.verify(records, image.rgb)


class BoxSource:
    """A detector's boxes as prompts: one image embedding, all the image's boxes in one
    decoder batch (``sam_core.box_prompts``), optionally refined by their masks.

    spec keys: ``model``, ``model_sha256``, ``output`` (whose ``boxes.parquet`` holds the
    boxes by entry name, ``pipeline.inputs.box_files``) and ``prompt`` (conf/stage/box_prompts.yaml:
    multimask_output, boxes_per_batch, stability_score_offset, box_frame, points,
    refine). Each mask record carries, besides SA-1B's keys: category_id, score (when the
    file has one), prompt_id, prompt_box (the box as given, in the stored image), box
    (the object's box: its mask's extent where refinement trusted the mask, else the
    prompt box) and box_source ("mask" or "detector"), all boxes XYWH in COCO's
    convention; gt_iou and gt_area where the box file gives the box's segmentation.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        from sam_core import SamPredictor

        self.predictor = SamPredictor(model.load_sam(spec["model"], spec.get("model_sha256")))
        self.prompt = dict(spec["prompt"])
        self.boxes = box_files.read_table(spec["output"])

    def __call__(self, item: Item, image: PreparedImage) -> list[dict[str, Any]]:
        from sam_core.box_prompts import predict_boxes, refine_boxes

        rows = [r for r in self.boxes.get(item.name, []) if r["x0"] is not None]
        size = (image.width, image.height)
        frame = self.prompt["box_frame"]
        stored = [box_files.stored_boxes(r, image.original_size, image.orientation, size, frame) for r in rows]
        inside = [i for i, b in enumerate(stored) if b[2] > b[0] and b[3] > b[1]]
        if not inside:
            return []  # an image with no box (or none inside it): kept, with no mask
        rows = [rows[i] for i in inside]
        boxes = np.stack([stored[i] for i in inside])
        points, labels = self._points(rows, image, size)
        self.predictor.set_image(image.rgb)
        answer = predict_boxes(
            self.predictor, boxes, points, labels,
            multimask_output=self.prompt["multimask_output"], boxes_per_batch=self.prompt["boxes_per_batch"],
            stability_score_offset=self.prompt["stability_score_offset"],
        )
        refine = self.prompt["refine"]
        chosen, trusted = boxes, np.zeros(len(rows), bool)
        if refine["enabled"]:
            chosen, trusted = refine_boxes(boxes, answer.mask_boxes, answer.predicted_iou, answer.stability_score,
                                           refine["pred_iou_thresh"], refine["stability_score_thresh"],
                                           refine["margin"])
        records = []
        for i, row in enumerate(rows):
            prompt_points = [] if points is None else [p for p, label in zip(points[i], labels[i]) if label >= 0]
            record = mask_record(answer.rles[i], answer.predicted_iou[i], answer.stability_score[i], size,
                                 prompt_points, category_id=row["category_id"], prompt_id=row["prompt_id"],
                                 prompt_box=xywh(boxes[i]), box=xywh(chosen[i]),
                                 box_source="mask" if trusted[i] else "detector")
            if row["score"] is not None:
                record["score"] = row["score"]
            if row["segmentation"] is not None:  # optional: a bad one costs only this box's score
                try:
                    truth = _ground_truth(row, image, size, frame)
                except (ValueError, TypeError, KeyError, IndexError) as e:
                    record["gt_problem"] = f"its ground-truth segmentation cannot be used: {type(e).__name__}: {e}"
                    log.warning("%s box %s: %s", item.name, row["prompt_id"], record["gt_problem"])
                else:
                    record["gt_area"] = int(mask_utils.area(truth))
                    record["gt_iou"] = float(mask_utils.iou([answer.rles[i]], [truth], [0])[0][0])
            records.append(record)
        return records

    def _points(self, rows: list[dict], image: PreparedImage, size: tuple[int, int]):
        """NxKx2 points and NxK labels (-1 pads) from the rows' keypoints, or (None, None)."""
        spec = self.prompt["points"]
        if not spec["use"]:
            return None, None
        per_box = []
        for row in rows:
            triples = np.asarray(row["keypoints"] or [], np.float64).reshape(-1, 3)
            visible = triples[triples[:, 2] >= spec["min_visibility"], :2]
            per_box.append(box_files.stored_frame(visible, row, image.original_size, image.orientation, size,
                                                  self.prompt["box_frame"]) if len(visible) else visible)
        k = max(len(p) for p in per_box)
        if k == 0:
            return None, None
        points = np.zeros((len(rows), k, 2), np.float32)
        labels = np.full((len(rows), k), -1, np.int64)
        for i, p in enumerate(per_box):
            points[i, : len(p)] = p
            labels[i, : len(p)] = 1
        return points, labels


def _ground_truth(row: dict, image: PreparedImage, size: tuple[int, int], frame: str) -> dict:
    """The row's COCO segmentation as a compressed RLE of the stored image."""
    segmentation = json.loads(row["segmentation"])
    w, h = size
    if isinstance(segmentation, list):  # polygons: map their vertices, then rasterise
        polygons = [
            box_files.stored_frame(np.asarray(p, np.float64).reshape(-1, 2), row, image.original_size,
                                   image.orientation, size, frame).ravel().tolist()
            for p in segmentation if len(p) >= 6
        ]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    fh, fw = (int(v) for v in segmentation["size"])
    if fh * fw > 4 * max(image.original_size[0] * image.original_size[1], h * w):
        raise ValueError(f"its size {fh}x{fw} is not the image's")
    if isinstance(segmentation["counts"], list):
        segmentation = mask_utils.frPyObjects(segmentation, fh, fw)
    problem = rle_problem(segmentation, fh, fw)
    if problem is not None:
        raise ValueError(problem)
    mask = mask_utils.decode(segmentation)
    name, _ = box_files.frame_of(row, image.original_size, image.orientation, frame)
    if name == "raw":
        mask = box_files.raw_mask_to_upright(mask, image.orientation)
    if mask.shape != (h, w):
        import cv2

        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


SOURCES: dict[str, Callable[[Mapping[str, Any]], MaskSource]] = {
    "grid": GridSource,
    "detector": DetectorSource,
    "boxes": BoxSource,
    "paste": paste.Paster,  # augment: objects pasted onto a background (a Rewritten image)
}


def build(spec: Mapping[str, Any]) -> MaskSource:
    """The mask source named by ``spec["kind"]``, built from the rest of ``spec``."""
    kind = spec.get("kind")
    if kind not in SOURCES:
        raise ValueError(f"unknown mask source {kind!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[kind](spec)
