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
    small regions from the final masks, as its official generator does;
  * full-size logits and masks of a decoder batch are made a few at a time
    (``max_mask_memory_mb``), so memory does not grow with masks x image size.
Additions, off by default: ``prompting="adaptive"`` and ``"objects"`` (fewer prompts, where
they are needed; see the constructor), and ``counts["prompts"]``.
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
PROMPTING = ("grid", "adaptive", "objects")
# How many prompts one decoder pass takes on a CPU, and how many bytes of per-prompt
# image tokens (``_batch_size``).
CPU_DECODER_BATCH = 8
CPU_DECODER_BYTES = 8 * 2**20
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
        prompting: str = "grid",
        adaptive_levels: int = 2,
        max_mask_memory_mb: int = 512,
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
        prompting: "grid" (the official generator: every grid point is a prompt),
            "adaptive" (coarse to fine over the same grid: ``adaptive_levels`` levels,
            every 2^k-th row and column, k = levels-1 .. 0; a finer level only where the
            masks kept so far leave gaps next to prompts that found something) or
            "objects" (``generate(image, boxes=...)``: the boxes are prompts first, then
            ``adaptive`` points for what they leave uncovered). Masks from a box are
            recorded with ``prompt_box`` (XYWH) and no ``point_coords``.
        max_mask_memory_mb: the full-size logits and masks of a decoder batch are made a
            few at a time within this budget, so memory does not grow with the image
            (masks go to RLE as they are made). Changes no mask.
        """
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"Unknown output_mode {output_mode!r}; expected one of {OUTPUT_MODES}")
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}; expected one of {tuple(PRECISIONS)}")
        if prompting not in PROMPTING:
            raise ValueError(f"Unknown prompting {prompting!r}; expected one of {PROMPTING}")
        if adaptive_levels < 1:
            raise ValueError(f"adaptive_levels must be >= 1, got {adaptive_levels}")
        if max_mask_memory_mb < 1:
            raise ValueError(f"max_mask_memory_mb must be >= 1, got {max_mask_memory_mb}")
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
            if prompting != "grid" and any(round(np.sqrt(len(g))) ** 2 != len(g) for g in self.point_grids):
                raise ValueError(f"prompting={prompting!r} refines a square n x n grid, row-major, as "
                                 "points_per_side builds; some point_grids are not square")
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
        self.prompting = prompting
        self.adaptive_levels = adaptive_levels
        self.chunk_bytes = max_mask_memory_mb * 2**20
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
    def generate(self, image: np.ndarray, boxes: Optional[np.ndarray] = None) -> List[Dict[str, Any]]:
        """Generates masks for an HxWx3 uint8 RGB image (and, with prompting="objects",
        its ``boxes``: N x 4 XYXY in image pixels, e.g. a detector's; may be empty).

        Returns one dict per mask:
          segmentation: HxW bool array (binary_mask), or an RLE dict {'size': [h, w],
            'counts': ...} with a list of run lengths (uncompressed_rle) or the COCO
            compressed string (coco_rle);
          area (int): pixels in the mask;
          bbox (list): box around the mask, XYWH;
          predicted_iou (float): the model's own quality estimate;
          point_coords (list[list[float]]): the prompt point, image pixels;
          stability_score (float): IoU of the mask thresholded at +/- offset;
          crop_box (list): the crop that produced the mask, XYWH;
          prompt_box (list, prompting="objects"): the box prompt, XYWH (point_coords empty).
        self.counts["prompts"] says how many prompts went through the decoder.
        """
        image = as_rgb_uint8(image)
        boxes = self._check_boxes(boxes, image.shape[:2])
        self.counts = dict.fromkeys(("prompts", "candidates", "passed_iou", "passed_stability"), 0)
        self.counts.update(best_iou=float("-inf"), best_stability=float("-inf"))
        data = self._generate_masks(image, boxes)
        if self.min_mask_region_area > 0 and self.predictor.model.family == "sam":
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
            data = self._drop_large(data, image.shape[0] * image.shape[1])
        self.counts["kept"] = len(data)
        self._warn_if_all_filtered()
        return [self._record(data, i) for i in range(len(data))]

    def _check_boxes(self, boxes: Optional[np.ndarray], size: Tuple[int, int]) -> Optional[np.ndarray]:
        """``boxes`` as float N x 4 XYXY clipped to the image, or an error naming the problem."""
        if self.prompting != "objects":
            if boxes is not None:
                raise ValueError(f"boxes are prompts only with prompting='objects' (this generator: "
                                 f"{self.prompting!r})")
            return None
        if boxes is None:
            raise ValueError("prompting='objects' needs boxes= (N x 4 XYXY, image pixels; may be empty)")
        if np.size(boxes) == 0:
            return np.zeros((0, 4))
        arr = np.asarray(boxes, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
            raise ValueError(f"boxes must be N x 4 finite XYXY values, got shape {np.shape(boxes)}")
        h, w = size
        arr = np.clip(arr, 0, [w, h, w, h])
        return arr[(arr[:, 2] > arr[:, 0]) & (arr[:, 3] > arr[:, 1])]

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
        record = self._official_record(data, i)
        if "prompt_boxes" in data and bool(torch.isfinite(data["prompt_boxes"][i]).all()):
            record["point_coords"] = []
            record["prompt_box"] = box_xyxy_to_xywh(data["prompt_boxes"][i].tolist())
        return record

    def _official_record(self, data: MaskData, i: int) -> Dict[str, Any]:
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

    def _generate_masks(self, image: np.ndarray, boxes: Optional[np.ndarray] = None) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = MaskData()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            if crop_box[2] <= crop_box[0] or crop_box[3] <= crop_box[1]:
                continue  # images a few pixels wide give empty crops in deep layers
            # The boxes prompt the whole image (layer 0); crops get the adaptive points.
            data.cat(self._process_crop(image, crop_box, layer_idx, orig_size, boxes if layer_idx == 0 else None))
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

    def _batch_size(self) -> int:
        """Prompts per decoder pass: ``points_per_batch``; on a CPU at most
        CPU_DECODER_BATCH, and no more than keep one pass's per-prompt image tokens within
        CPU_DECODER_BYTES (8 prompts of the default model, 2 of SAM's and SAM 2's
        64x64x256). Changes no mask (batches are concatenated in order); on a CPU the
        elementwise passes over those tokens then run from cache, not main memory
        (measured, one thread: the default model's generator 2.9 s per photo at 8, 3.4 at
        16, its decoder 4.8 s per 1,024 prompts at 64 and 3.1 at 8; a 256-wide 64x64
        decoder 1.7 s per 64 prompts at 2-4, 1.8 at 8, 2.2 at 1)."""
        if self.predictor.device.type != "cpu":
            return self.points_per_batch
        per_prompt = self.predictor.features[0].numel() * 4
        return max(1, min(self.points_per_batch, CPU_DECODER_BATCH, CPU_DECODER_BYTES // per_prompt))

    def _process_crop(
        self, image: np.ndarray, crop_box: List[int], layer_idx: int, orig_size: Tuple[int, int],
        boxes: Optional[np.ndarray] = None,
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
        if self.prompting == "grid":
            for (points,) in batch_iterator(self._batch_size(), points_for_crop):
                data.cat(self._process_batch(points, crop_size, crop_box, orig_size)[0])
        else:
            data = self._prompt_where_uncovered(points_for_crop, crop_size, crop_box, orig_size, boxes)
        self.predictor.reset_image()
        if not len(data):
            return _empty(crop_box, self.prompting == "objects")
        keep = batched_nms(
            data["boxes"].float(),
            data["iou_preds"],
            torch.zeros(len(data), device=data["boxes"].device),
            iou_threshold=self.box_nms_thresh,
        )
        data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        if "prompt_boxes" in data:
            data["prompt_boxes"] = uncrop_boxes_xyxy(data["prompt_boxes"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data), dtype=torch.long)
        return data

    def _prompt_where_uncovered(
        self, grid: np.ndarray, crop_size: Tuple[int, int], crop_box: List[int], orig_size: Tuple[int, int],
        boxes: Optional[np.ndarray],
    ) -> MaskData:
        """``adaptive`` and ``objects`` prompting: the boxes first (objects), then the grid's
        points coarse to fine: every 2^k-th row and column of the full grid, k =
        adaptive_levels - 1 down to 0. The coarsest level prompts every point no box mask
        covers; each finer level only the points that (a) no kept mask covers yet, and
        (b) lie next to (within one coarse step of) a prompt that kept a mask: gaps where
        something was found are filled in, stretches where the coarse prompts found nothing
        are given up. "Covered" means by the finest (smallest) mask each prompt kept, not
        its wholes: a point on a cup is not settled by the table's mask, so parts and
        wholes are both still found. Every prompt is a point of the full grid (or a box)."""
        n = int(round(np.sqrt(len(grid))))
        h, w = crop_size
        probe = (torch.as_tensor(np.clip(grid[:, 1].astype(np.int64), 0, h - 1)),
                 torch.as_tensor(np.clip(grid[:, 0].astype(np.int64), 0, w - 1)))
        covered = np.zeros(len(grid), bool)
        data = MaskData()
        if boxes is not None and len(boxes):
            for (batch,) in batch_iterator(self._batch_size(), boxes):
                found, hit, _ = self._process_batch(None, crop_size, crop_box, orig_size, boxes=batch, probe=probe)
                data.cat(found)
                covered |= hit
        index = np.arange(n * n).reshape(n, n)
        prompted = np.zeros((n, n), bool)
        productive = np.zeros((n, n), bool)  # prompts that kept at least one mask
        # A small grid (a deep crop layer's) has fewer levels: the coarsest is never empty.
        levels = next(k for k in range(self.adaptive_levels, 0, -1) if 2 ** (k - 1) // 2 < n)
        for level in reversed(range(levels)):
            stride = 2**level
            rows, cols = np.meshgrid(np.arange(stride // 2, n, stride), np.arange(stride // 2, n, stride),
                                     indexing="ij")
            rows, cols = rows.ravel(), cols.ravel()
            eligible = ~prompted[rows, cols] & ~covered[index[rows, cols]]
            if level < levels - 1:
                near = np.pad(productive, stride)  # one coarse step around each productive prompt
                window = np.lib.stride_tricks.sliding_window_view(near, (2 * stride + 1, 2 * stride + 1))
                eligible &= window.any(axis=(-1, -2))[rows, cols]
            chosen = index[rows[eligible], cols[eligible]]
            for (batch,) in batch_iterator(self._batch_size(), chosen):
                found, hit, kept = self._process_batch(grid[batch], crop_size, crop_box, orig_size, probe=probe)
                data.cat(found)
                covered |= hit
                prompted.flat[batch] = True
                productive.flat[batch[kept]] = True
        return data

    def _process_batch(
        self, points: Optional[np.ndarray], crop_size: Tuple[int, int], crop_box: List[int],
        orig_size: Tuple[int, int], boxes: Optional[np.ndarray] = None,
        probe: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Tuple[MaskData, Optional[np.ndarray], np.ndarray]:
        """The kept masks of one batch of point prompts (or, ``boxes``, XYXY box prompts in
        the crop's pixels: one mask each, recorded with its ``prompt_boxes`` and a NaN point);
        given ``probe`` (rows, columns of pixels of the crop), which of those pixels the
        finest kept mask of each prompt covers; and which prompts kept a mask."""
        predictor = self.predictor
        model, device = predictor.model, predictor.device
        decoder = model.mask_decoder
        high_res = predictor.get_high_res_features()
        if boxes is not None:
            in_boxes = torch.as_tensor(predictor.transform.apply_boxes(boxes, crop_size), device=device,
                                       dtype=torch.float)
            sparse, dense = model.prompt_encoder(points=None, boxes=in_boxes, masks=None)
            n_prompts, multimask = len(boxes), False
            prompt_points = np.full((len(boxes), 2), np.nan)
        else:
            in_points = torch.as_tensor(predictor.transform.apply_coords(points, crop_size), device=device)
            in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=device)
            sparse, dense = model.prompt_encoder(points=(in_points[:, None, :], in_labels[:, None]), boxes=None,
                                                 masks=None)
            n_prompts, multimask, prompt_points = len(points), self.multimask_output, points
        self.counts["prompts"] = self.counts.get("prompts", 0) + n_prompts
        tokens, features = decoder.run_transformer(
            predictor.features[:1], model.prompt_encoder.get_dense_pe(), sparse, dense
        )
        if multimask and not self.use_m2m:
            iou_preds = decoder.iou_from_tokens(tokens)[:, 1:]  # the multimask outputs
            n_out = iou_preds.shape[1]
            data = MaskData(
                iou_preds=iou_preds.flatten(),
                points=torch.as_tensor(prompt_points.repeat(n_out, axis=0), device=device),
                prompt=torch.arange(n_prompts, device=device).repeat_interleave(n_out),
                output=torch.arange(1, n_out + 1, device=device).repeat(n_prompts),
            )
            self._tally("candidates", len(data), data["iou_preds"], "best_iou")
            if self.pred_iou_thresh > 0.0:
                data.filter(data["iou_preds"] > self.pred_iou_thresh)
            self._tally("passed_iou", len(data))
            if not len(data):
                return MaskData(), self._coverage(None, probe), np.zeros(n_prompts, bool)
            # Only prompts with a surviving mask pay for upscaling and the hypernetworks.
            prompts, slot = torch.unique(data["prompt"], return_inverse=True)
            low_res = decoder.masks_from_tokens(tokens[prompts], features[prompts], high_res)[slot, data["output"]]
            del data["output"], tokens, features
        else:
            # One answer per prompt, or every candidate refined: masks are needed for all.
            low_res, iou_preds = decoder.select(decoder.masks_from_tokens(tokens, features, high_res),
                                                decoder.iou_from_tokens(tokens), multimask)
            n_out = iou_preds.shape[1]
            data = MaskData(iou_preds=iou_preds.flatten(),
                            points=torch.as_tensor(prompt_points.repeat(n_out, axis=0), device=device),
                            prompt=torch.arange(n_prompts, device=device).repeat_interleave(n_out))
            low_res = low_res.flatten(0, 1)
            del tokens, features
            if self.use_m2m and boxes is None:
                low_res, data["iou_preds"] = self._refine(in_points.repeat_interleave(n_out, dim=0), low_res)
            self._tally("candidates", len(data), data["iou_preds"], "best_iou")
            if self.pred_iou_thresh > 0.0:
                keep = data["iou_preds"] > self.pred_iou_thresh
                data.filter(keep)
                low_res = low_res[keep]
            self._tally("passed_iou", len(data))
            if not len(data):
                return MaskData(), self._coverage(None, probe), np.zeros(n_prompts, bool)
        if self.prompting == "objects":  # every row says whether a box prompted it
            prompt_boxes = torch.full((n_prompts, 4), float("nan"), device=device)
            if boxes is not None:
                prompt_boxes[:] = torch.as_tensor(boxes, dtype=torch.float, device=device)
            data["prompt_boxes"] = prompt_boxes[data["prompt"]]
        if model.family == "sam2" and self.min_mask_region_area > 0:
            low_res = fill_small_regions(low_res, self.mask_threshold, self.min_mask_region_area,
                                         self.min_mask_region_area)
        # Upsampled logits and full-size masks cost 5 bytes a pixel each: a few at a time,
        # so one batch's memory does not grow with the image (6000x4000: 120 MB a mask).
        orig_h, orig_w = orig_size
        per_chunk = max(1, self.chunk_bytes // (5 * orig_h * orig_w))
        kept, finest = MaskData(), []
        productive = np.zeros(n_prompts, bool)
        for start in range(0, len(data), per_chunk):
            rows = torch.arange(start, min(start + per_chunk, len(data)), device=low_res.device)
            part = MaskData(**{k: v[rows] for k, v in data.items()})
            masks = self._finish(part, low_res[rows], crop_size, crop_box, orig_size)
            if probe is not None and len(part):
                finest.append(self._finest(part, masks, probe))
            productive[part["prompt"].cpu().numpy()] = True
            del part["prompt"]
            kept.cat(part)
        return kept, self._coverage(finest, probe), productive

    def _finish(self, data: MaskData, low_res: torch.Tensor, crop_size: Tuple[int, int], crop_box: List[int],
                orig_size: Tuple[int, int]) -> torch.Tensor:
        """Upsamples, scores, thresholds and filters ``data``'s masks (in place), adds their
        boxes and RLEs, and returns the kept masks (crop frame, bool)."""
        model, predictor = self.predictor.model, self.predictor
        orig_h, orig_w = orig_size
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
        return masks

    @staticmethod
    def _finest(data: MaskData, masks: torch.Tensor,
                probe: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt, area, probe pixels covered) of each kept mask, for ``_coverage``."""
        rows, cols = (t.to(masks.device) for t in probe)
        return data["prompt"], masks.flatten(1).sum(1), masks[:, rows, cols]

    @staticmethod
    def _coverage(finest: Optional[list], probe: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Optional[np.ndarray]:
        """The probe pixels covered by the smallest kept mask of each prompt (its finest
        answer), or None without a probe."""
        if probe is None:
            return None
        covered = np.zeros(len(probe[0]), bool)
        if not finest:
            return covered
        prompt = torch.cat([f[0] for f in finest]).cpu()
        area = torch.cat([f[1] for f in finest]).cpu()
        hits = torch.cat([f[2] for f in finest]).cpu()
        for p in torch.unique(prompt):
            mine = torch.nonzero(prompt == p)[:, 0]
            covered |= hits[mine[torch.argmin(area[mine])]].numpy()
        return covered

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


def _empty(crop_box: List[int], with_prompt_boxes: bool = False) -> MaskData:
    data = MaskData(
        iou_preds=torch.zeros(0),
        points=torch.zeros(0, 2, dtype=torch.float64),
        stability_score=torch.zeros(0),
        boxes=torch.zeros(0, 4, dtype=torch.long),
        rles=[],
        crop_boxes=torch.zeros(0, 4, dtype=torch.long),
    )
    if with_prompt_boxes:
        data["prompt_boxes"] = torch.zeros(0, 4)
    return data
