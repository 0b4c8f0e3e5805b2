"""SamAutomaticMaskGenerator: masks for a whole image from a grid of point prompts, for
SAM 1 and SAM 2 / 2.1 models alike (SAM2AutomaticMaskGenerator: the same class with
SAM 2's defaults).

Drop-in compatible with the official classes (same parameters, defaults and record keys;
SAM 2's ``use_m2m``, ``multimask_output`` and ``mask_threshold`` work with either family).
Deliberate differences, none of which change the returned masks:
  * predicted-IoU filtering happens right after the decoder's transformer: mask logits
    are only built (upscaling, hypernetworks) and upsampled for prompts that keep a mask;
  * masks are kept as COCO compressed RLE (encoded by pycocotools) instead of the
    official uncompressed form, and converted to the requested output_mode at the end;
  * extra option ``max_mask_area_fraction`` drops masks covering at least that fraction
    of the image (SA-1B used 0.95); None (the default) keeps the official behaviour;
  * the input image is validated and converted (see sam_core.utils.inputs.as_rgb_uint8);
  * SAM 2's ``min_mask_region_area`` fills holes and removes specks in the low-res
    logits as the official package does with its CUDA extension, but on any device
    (without that extension the official generator silently skips it); SAM 1's removes
    small regions from the final masks, as its official generator does.
Extra option ``precision="bf16"`` (a fast path for GPUs, off by default) runs the image
encoder under bfloat16 autocast; the mask decoder, whose outputs are thresholded
(predicted IoU, stability, binarisation), stays in float32: with the decoder in bf16 too,
13% of the masks of the shipped model changed across the thresholds; encoder-only bf16
keeps >= 97% of them (tests/test_default_model.py).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchvision.ops.boxes import batched_nms, box_area

from .modeling import Sam
from .predictor import SamPredictor
from .utils.amg import (
    MaskData,
    area_from_rle,
    batch_iterator,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_rle_to_json,
    decode_rle,
    encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncompressed_rle,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from .utils.inputs import as_rgb_uint8
from .utils.regions import fill_small_regions

log = logging.getLogger(__name__)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
FAMILY_PRED_IOU_THRESH = {"sam": 0.88, "sam2": 0.8}  # the official generators' defaults
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}

# Named generator settings, as changes to the constructor's defaults (the official
# ones). "sa1b" reproduces the settings of the released SA-1B annotations (crop boxes
# and grid points match; paper appendix): 2 crop layers with a downscaled grid,
# regions and holes under 100 px cleaned up, masks covering >= 95% of the image
# dropped. conf/amg/<name>.yaml are the same presets for the pipeline
# (tests/test_sam_core.py checks that they agree).
AMG_PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "sa1b": dict(
        crop_n_layers=2,
        crop_n_points_downscale_factor=2,
        min_mask_region_area=100,
        max_mask_area_fraction=0.95,
    ),
    # The sam2 example notebook's denser settings for SAM 2 ("more masks"): a 64-point
    # grid, looser filters, one crop layer, small regions cleaned, mask-to-mask refinement.
    "sam2_dense": dict(
        points_per_side=64,
        points_per_batch=128,
        pred_iou_thresh=0.7,
        stability_score_thresh=0.92,
        stability_score_offset=0.7,
        crop_n_layers=1,
        box_nms_thresh=0.7,
        crop_n_points_downscale_factor=2,
        min_mask_region_area=25,
        use_m2m=True,
    ),
}


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model: Sam,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: Optional[float] = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        max_mask_area_fraction: Optional[float] = None,
        precision: str = "fp32",
        use_m2m: bool = False,
        multimask_output: bool = True,
        mask_threshold: Optional[float] = None,
    ) -> None:
        """See the official documentation for every parameter but these:

        max_mask_area_fraction: drop masks whose area is at least this fraction of the
            image area (None keeps all). Applied before NMS, so that a mask covering
            the whole image cannot suppress a large but legitimate one.
        precision: "fp32" (exact, the official behaviour) or "bf16" (image encoder under
            bfloat16 autocast, decoder in float32; for GPUs, no faster on most CPUs).
        pred_iou_thresh: None means the official default of the model's family (SAM 1
            0.88, SAM 2 0.8; what conf/amg/default.yaml asks for).
        use_m2m, multimask_output, mask_threshold: as in SAM 2's generator (one more
            decoder pass with each candidate's own low-res mask as input; one output per
            point instead of three; the logit threshold, None: the model's).
        """
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"Unknown output_mode {output_mode!r}; expected one of {OUTPUT_MODES}")
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}; expected one of {tuple(PRECISIONS)}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if max_mask_area_fraction is not None and not 0 < max_mask_area_fraction <= 1:
            raise ValueError(f"max_mask_area_fraction must be in (0, 1], got {max_mask_area_fraction}")
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            if len(point_grids) != crop_n_layers + 1:
                raise ValueError(f"point_grids needs crop_n_layers + 1 = {crop_n_layers + 1} grids, "
                                 f"got {len(point_grids)}")
            self.point_grids = [np.asarray(g, dtype=float) for g in point_grids]
        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = FAMILY_PRED_IOU_THRESH[model.family] if pred_iou_thresh is None else pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.max_mask_area_fraction = max_mask_area_fraction
        self.precision = precision
        self.use_m2m = use_m2m
        self.multimask_output = multimask_output
        self.mask_threshold = model.mask_threshold if mask_threshold is None else mask_threshold
        # What the filters did in the last ``generate`` (candidates, passed_iou,
        # passed_stability, kept, best_iou, best_stability), so nothing is dropped silently.
        self.counts: Dict[str, float] = {}
        self._warned = False

    def _encoder_precision(self) -> contextlib.AbstractContextManager:
        """The context the image encoder runs in: autocast for bf16, nothing for fp32."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.predictor.device.type, dtype=dtype)

    @classmethod
    def from_preset(cls, model: Sam, preset: str = "sa1b", **overrides: Any) -> "SamAutomaticMaskGenerator":
        """A generator with the named settings of AMG_PRESETS, plus overrides."""
        if preset not in AMG_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(AMG_PRESETS)}")
        return cls(model, **{**AMG_PRESETS[preset], **overrides})

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Generates masks for an HxWx3 uint8 RGB image.

        Returns one dict per mask:
          segmentation: HxW bool array (binary_mask), or an RLE dict {'size': [h, w],
            'counts': ...} with a list of run lengths (uncompressed_rle) or the COCO
            compressed string (coco_rle);
          area (int): pixels in the mask;
          bbox (list): box around the mask, XYWH;
          predicted_iou (float): the model's own quality estimate;
          point_coords (list[list[float]]): the prompt point, image pixels;
          stability_score (float): IoU of the mask thresholded at +/- offset;
          crop_box (list): the crop that produced the mask, XYWH.
        """
        image = as_rgb_uint8(image)
        self.counts = dict.fromkeys(("candidates", "passed_iou", "passed_stability"), 0)
        self.counts.update(best_iou=float("-inf"), best_stability=float("-inf"))
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0 and self.predictor.model.family == "sam":
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
            data = self._drop_large(data, image.shape[0] * image.shape[1])
        self.counts["kept"] = len(data)
        self._warn_if_all_filtered()
        return [self._record(data, i) for i in range(len(data))]

    def _warn_if_all_filtered(self) -> None:
        """Warns once per generator when its thresholds dropped every candidate."""
        c = self.counts
        if self._warned or not c["candidates"] or c["kept"]:
            return
        self._warned = True
        def best(value: float) -> str:
            return f"{value:.3f}" if value > float("-inf") else "none measured"

        log.warning(
            "no mask kept of %d candidates: %d passed pred_iou_thresh=%s (best predicted IoU %s), %d passed "
            "stability_score_thresh=%s (best stability %s). A model calibrated lower than SAM (such as the "
            "project's small default model: 0.4 / 0.85) needs lower thresholds", c["candidates"], c["passed_iou"],
            self.pred_iou_thresh, best(c["best_iou"]), c["passed_stability"], self.stability_score_thresh,
            best(c["best_stability"]))

    def _tally(self, name: str, count: int, best: Optional[torch.Tensor] = None, best_name: str = "") -> None:
        self.counts[name] += count
        if best is not None and best.numel():
            self.counts[best_name] = max(self.counts[best_name], float(best.max()))

    def _record(self, data: MaskData, i: int) -> Dict[str, Any]:
        rle = data["rles"][i]
        if self.output_mode == "coco_rle":
            segmentation: Any = coco_rle_to_json(rle)
        elif self.output_mode == "binary_mask":
            segmentation = decode_rle(rle)
        else:
            segmentation = uncompressed_rle(decode_rle(rle))
        return {
            "segmentation": segmentation,
            "area": area_from_rle(rle),
            "bbox": box_xyxy_to_xywh(data["boxes"][i].tolist()),
            "predicted_iou": float(data["iou_preds"][i]),
            "point_coords": [data["points"][i].tolist()],
            "stability_score": float(data["stability_score"][i]),
            "crop_box": box_xyxy_to_xywh(data["crop_boxes"][i].tolist()),
        }

    def _generate_masks(self, image: np.ndarray) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = MaskData()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            if crop_box[2] <= crop_box[0] or crop_box[3] <= crop_box[1]:
                continue  # images a few pixels wide give empty crops in deep layers
            data.cat(self._process_crop(image, crop_box, layer_idx, orig_size))
        if len(crop_boxes) > 1 and len(data):
            # Between crops, prefer the mask from the smaller crop (finer detail).
            scores = 1 / box_area(data["crop_boxes"].float())
            keep = batched_nms(
                data["boxes"].float(),
                scores.to(data["boxes"].device),
                torch.zeros(len(data), device=data["boxes"].device),
                iou_threshold=self.crop_nms_thresh,
            )
            data.filter(keep)
        return data

    def _process_crop(
        self, image: np.ndarray, crop_box: List[int], layer_idx: int, orig_size: Tuple[int, int]
    ) -> MaskData:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        with self._encoder_precision():
            self.predictor.set_image(crop)
        self.predictor.features = self.predictor.features.float()
        self.predictor.high_res_features = [level.float() for level in self.predictor.high_res_features]
        points_for_crop = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
        data = MaskData()
        for (points,) in batch_iterator(self.points_per_batch, points_for_crop):
            data.cat(self._process_batch(points, crop_size, crop_box, orig_size))
        self.predictor.reset_image()
        if not len(data):
            return _empty(crop_box)
        keep = batched_nms(
            data["boxes"].float(),
            data["iou_preds"],
            torch.zeros(len(data), device=data["boxes"].device),
            iou_threshold=self.box_nms_thresh,
        )
        data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data), dtype=torch.long)
        return data

    def _process_batch(
        self, points: np.ndarray, crop_size: Tuple[int, int], crop_box: List[int], orig_size: Tuple[int, int]
    ) -> MaskData:
        orig_h, orig_w = orig_size
        predictor = self.predictor
        model, device = predictor.model, predictor.device
        in_points = torch.as_tensor(predictor.transform.apply_coords(points, crop_size), device=device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=device)
        decoder = model.mask_decoder
        high_res = predictor.get_high_res_features()
        sparse, dense = model.prompt_encoder(points=(in_points[:, None, :], in_labels[:, None]), boxes=None, masks=None)
        tokens, features = decoder.run_transformer(
            predictor.features[:1], model.prompt_encoder.get_dense_pe(), sparse, dense
        )
        if self.multimask_output and not self.use_m2m:
            iou_preds = decoder.iou_from_tokens(tokens)[:, 1:]  # the multimask outputs
            n_prompts, n_out = iou_preds.shape
            data = MaskData(
                iou_preds=iou_preds.flatten(),
                points=torch.as_tensor(points.repeat(n_out, axis=0), device=device),
                prompt=torch.arange(n_prompts, device=device).repeat_interleave(n_out),
                output=torch.arange(1, n_out + 1, device=device).repeat(n_prompts),
            )
            self._tally("candidates", len(data), data["iou_preds"], "best_iou")
            if self.pred_iou_thresh > 0.0:
                data.filter(data["iou_preds"] > self.pred_iou_thresh)
            self._tally("passed_iou", len(data))
            if not len(data):
                return MaskData()
            # Only prompts with a surviving mask pay for upscaling and the hypernetworks.
            prompts, slot = torch.unique(data["prompt"], return_inverse=True)
            low_res = decoder.masks_from_tokens(tokens[prompts], features[prompts], high_res)[slot, data["output"]]
            del data["prompt"], data["output"], tokens, features
        else:
            # One answer per point, or every candidate refined: masks are needed for all.
            low_res, iou_preds = decoder.select(decoder.masks_from_tokens(tokens, features, high_res),
                                                decoder.iou_from_tokens(tokens), self.multimask_output)
            n_out = iou_preds.shape[1]
            data = MaskData(iou_preds=iou_preds.flatten(),
                            points=torch.as_tensor(points.repeat(n_out, axis=0), device=device))
            low_res = low_res.flatten(0, 1)
            del tokens, features
            if self.use_m2m:
                low_res, data["iou_preds"] = self._refine(in_points.repeat_interleave(n_out, dim=0), low_res)
            self._tally("candidates", len(data), data["iou_preds"], "best_iou")
            if self.pred_iou_thresh > 0.0:
                keep = data["iou_preds"] > self.pred_iou_thresh
                data.filter(keep)
                low_res = low_res[keep]
            self._tally("passed_iou", len(data))
            if not len(data):
                return MaskData()
        if model.family == "sam2" and self.min_mask_region_area > 0:
            low_res = fill_small_regions(low_res, self.mask_threshold, self.min_mask_region_area,
                                         self.min_mask_region_area)
        logits = model.postprocess_masks(low_res[:, None], predictor.input_size, crop_size)[:, 0]
        threshold = self.mask_threshold
        data["stability_score"] = calculate_stability_score(logits, threshold, self.stability_score_offset)
        self._tally("passed_stability", 0, data["stability_score"], "best_stability")
        if self.stability_score_thresh > 0.0:
            keep = data["stability_score"] >= self.stability_score_thresh
            data.filter(keep)
            logits = logits[keep]
        self._tally("passed_stability", len(data))
        masks = logits > threshold
        del logits
        data["boxes"] = batched_mask_to_box(masks)
        keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if self.max_mask_area_fraction is not None:
            areas = masks.sum((-1, -2))
            keep &= areas < self.max_mask_area_fraction * orig_h * orig_w
        if not torch.all(keep):
            data.filter(keep)
            masks = masks[keep]
        data["rles"] = encode_rle(uncrop_masks(masks, crop_box, orig_h, orig_w))
        return data

    def _refine(self, in_points: torch.Tensor, low_res: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's mask-to-mask refinement: each candidate decoded again from its point and
        its own low-res logits (clipped as the predictor returns them), one answer each.
        Returns (low-res logits n x h x w, predicted IoU n)."""
        model = self.predictor.model
        mask_input = low_res.clamp(-32.0, 32.0)[:, None]
        labels = torch.ones(len(in_points), 1, dtype=torch.int, device=in_points.device)
        sparse, dense = model.prompt_encoder(points=(in_points[:, None, :], labels), boxes=None, masks=mask_input)
        refined, iou = model.mask_decoder(self.predictor.features[:1], model.prompt_encoder.get_dense_pe(), sparse,
                                          dense, multimask_output=False,
                                          high_res_features=self.predictor.get_high_res_features())
        return refined[:, 0], iou[:, 0]

    def _drop_large(self, data: MaskData, image_area: int) -> MaskData:
        if self.max_mask_area_fraction is None or not len(data):
            return data
        areas = torch.tensor([area_from_rle(r) for r in data["rles"]])
        data.filter(areas < self.max_mask_area_fraction * image_area)
        return data

    @staticmethod
    def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Fills holes and removes islands smaller than min_area, then reruns box NMS
        preferring masks that needed no change. Edits mask_data in place."""
        if not len(mask_data):
            return mask_data
        masks, unchanged = [], []
        for rle in mask_data["rles"]:
            mask, changed_holes = remove_small_regions(decode_rle(rle), min_area, mode="holes")
            mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
            masks.append(torch.as_tensor(mask))
            unchanged.append(not (changed_holes or changed_islands))
        masks_t = torch.stack(masks)
        boxes = batched_mask_to_box(masks_t)
        scores = torch.tensor(unchanged, dtype=torch.float)
        keep = batched_nms(boxes.float(), scores, torch.zeros(len(boxes)), iou_threshold=nms_thresh)
        mask_data["boxes"] = mask_data["boxes"].cpu()
        for i in keep.tolist():
            if not unchanged[i]:
                mask_data["rles"][i] = encode_rle(masks_t[i : i + 1])[0]
                mask_data["boxes"][i] = boxes[i]
        mask_data.filter(keep)
        return mask_data


class SAM2AutomaticMaskGenerator(SamAutomaticMaskGenerator):
    """The generator with the official SAM 2 defaults (pred_iou_thresh 0.8; the rest are
    SAM 1's). Takes SAM 1 models too."""

    def __init__(self, model: Sam, points_per_side: Optional[int] = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.8, **kwargs: Any) -> None:
        super().__init__(model, points_per_side=points_per_side, points_per_batch=points_per_batch,
                         pred_iou_thresh=pred_iou_thresh, **kwargs)


def _empty(crop_box: List[int]) -> MaskData:
    return MaskData(
        iou_preds=torch.zeros(0),
        points=torch.zeros(0, 2, dtype=torch.float64),
        stability_score=torch.zeros(0),
        boxes=torch.zeros(0, 4, dtype=torch.long),
        rles=[],
        crop_boxes=torch.zeros(0, 4, dtype=torch.long),
    )
