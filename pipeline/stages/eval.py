"""Stage ``eval``: how good is a model, on ground truth it was not trained on.

    python -m pipeline.run +stage=eval [model=...] [stage.checkpoint=VERSION|PATH] [output=DIR]

Metrics (SAM paper protocol where it has one):
- point mIoU after 1 and k clicks: the first click at the point of the object farthest
  from its boundary, each next one at the same spot of the largest error region
  (positive on a miss, negative on a spill), the previous low-res logits as mask prompt.
  With one click the answer is the candidate with the highest predicted IoU; the
  oracle (best of three) is reported too.
- box mIoU: the tight ground-truth box, single-mask output.
- automatic generation: recall (ground-truth masks matched) and precision (generated
  masks matching) at IoU 0.5 and 0.75.
- resolution ceiling: the mIoU a perfect answer at the model's mask resolution would
  get on the prompted masks; no prompted metric of this architecture can pass it.
Printed as a table and written to ``<output>/eval.json``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from pipeline.dataset import committed_shards
from pipeline.model import generator_kwargs
from pipeline.stages.retrain import (
    GroundTruth, build_model, iter_coco, iter_shards, iter_synthetic, registered_arch,
    resolve_model_path,
)
from pipeline.synthetic import scene_seeds

log = logging.getLogger(__name__)


def ground_truth(eval_cfg: Mapping[str, Any]) -> Iterator[GroundTruth]:
    """The configured held-out images: synthetic test seeds, shards or COCO."""
    source, n = eval_cfg["source"], int(eval_cfg["num_images"])
    if source == "synthetic":
        size = tuple(eval_cfg.get("size") or (512, 512))
        yield from iter_synthetic(scene_seeds("test", int(eval_cfg["seed_start"]), n), size)
        return
    if source == "shards":
        it = iter_shards(committed_shards(eval_cfg["shards"]), float(eval_cfg.get("min_predicted_iou", 0.0)),
                         float(eval_cfg.get("min_stability", 0.0)))
    elif source == "coco":
        it = iter_coco(eval_cfg["coco"]["annotations"], eval_cfg["coco"]["image_dir"])
    else:
        raise ValueError(f"unknown eval source {source!r}: synthetic, shards or coco")
    for i, gt in enumerate(it):
        if i >= n:
            return
        yield gt


def _peak(region: np.ndarray) -> tuple[tuple[int, int], float]:
    """(x, y) of the pixel farthest from the region's boundary (image edges count as
    boundary, as in the RITM/SAM protocol) and that distance."""
    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (int(x), int(y)), float(dist[y, x])


def next_click(gt: np.ndarray, pred: np.ndarray | None) -> tuple[tuple[int, int], int]:
    """The next simulated click: ((x, y), label) at the centre of the largest error."""
    if pred is None:
        return _peak(gt)[0], 1
    fn_xy, fn_d = _peak(gt & ~pred)
    fp_xy, fp_d = _peak(pred & ~gt)
    if fn_d == 0 and fp_d == 0:  # already exact: repeat a positive click at the centre
        return _peak(gt)[0], 1
    return (fn_xy, 1) if fn_d >= fp_d else (fp_xy, 0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@torch.no_grad()
def prompt_ious(predictor, masks: np.ndarray, clicks: int) -> dict[str, np.ndarray]:
    """Per-mask IoUs of interactive prompting on the predictor's current image.

    Returns: clicks (Mxclicks IoU after each click), oracle1 (M, best of the three
    1-click candidates), box (M, tight-box IoU).
    """
    device = predictor.device
    size = masks.shape[1:]
    m = len(masks)
    coords: list[list[tuple[int, int]]] = [[] for _ in range(m)]
    labels: list[list[int]] = [[] for _ in range(m)]
    preds: list[np.ndarray | None] = [None] * m
    click_iou = np.zeros((m, clicks))
    oracle = np.zeros(m)
    logits = None
    for k in range(clicks):
        for i in range(m):
            xy, lbl = next_click(masks[i], preds[i])
            coords[i].append(xy)
            labels[i].append(lbl)
        pts = predictor.transform.apply_coords_torch(torch.tensor(coords, dtype=torch.float, device=device), size)
        lbls = torch.tensor(labels, device=device)
        out, iou_pred, low = predictor.predict_torch(pts, lbls, mask_input=logits, multimask_output=(k == 0))
        best = iou_pred.argmax(1)
        rows = torch.arange(m, device=device)
        chosen = out[rows, best].cpu().numpy()
        logits = low[rows, best][:, None]
        for i in range(m):
            preds[i] = chosen[i]
            click_iou[i, k] = mask_iou(chosen[i], masks[i])
            if k == 0:
                oracle[i] = max(mask_iou(c, masks[i]) for c in out[i].cpu().numpy())
    boxes = []
    for mk in masks:
        ys, xs = np.nonzero(mk.any(1))[0], np.nonzero(mk.any(0))[0]
        boxes.append([xs[0], ys[0], xs[-1], ys[-1]])
    b = predictor.transform.apply_boxes_torch(torch.tensor(boxes, dtype=torch.float, device=device), size)
    out, _, _ = predictor.predict_torch(None, None, boxes=b, multimask_output=False)
    box_iou = np.array([mask_iou(o[0], mk) for o, mk in zip(out.cpu().numpy(), masks)])
    return {"clicks": click_iou, "oracle1": oracle, "box": box_iou}


def resolution_ceiling(masks: np.ndarray, low_res: int) -> np.ndarray:
    """IoU each of the masks (MxHxW bool) would get from a perfect answer at ``low_res``.

    SAM's decoder answers with ``low_res`` x ``low_res`` logits over its square input
    frame (the image's longest side), which are upsampled bilinearly and thresholded.
    A mask's best answer at that size is about its own area average, upsampled the same
    way and thresholded at one half: small and thin objects lose most (a 256-px model
    answers at 64x64, i.e. 8x8 pixels of a 512-px image per logit).
    """
    from sam_core.training import binary_mask_iou

    h, w = masks.shape[1:]
    scale = low_res / max(h, w)
    m = torch.from_numpy(masks).float()[:, None]
    low = F.interpolate(m, (max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    best = F.interpolate(low, (h, w), mode="bilinear", align_corners=False)[:, 0] > 0.5
    return binary_mask_iou(best, m[:, 0] > 0).numpy()


def amg_matches(records: list[dict[str, Any]], masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best IoU of each ground-truth mask, best IoU of each generated mask)."""
    from pycocotools import mask as mask_utils

    n_pred, n_gt = len(records), len(masks)
    if n_pred == 0 or n_gt == 0:
        return np.zeros(n_gt), np.zeros(n_pred)
    pred = [r["segmentation"] for r in records]
    gt = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    ious = np.asarray(mask_utils.iou(gt, pred, [0] * n_pred)).reshape(n_gt, n_pred)
    return ious.max(1), ious.max(0)


def evaluate_model(
    arch: str, checkpoint: str | None, eval_cfg: Mapping[str, Any] | DictConfig,
    amg_cfg: Mapping[str, Any] | DictConfig, out_dir: Path | None, device: str = "auto",
) -> dict[str, Any]:
    """Evaluates a model; writes ``out_dir/eval.json`` when ``out_dir`` is given.

    Returns a dict: images, masks, point_miou_<k> for each configured click count,
    point_miou_1_oracle, box_miou, resolution_ceiling_miou, amg_recall_<t>, amg_precision_<t> per IoU
    threshold, amg_masks_per_image, seconds, plus model and source.
    """
    import sam_core

    if isinstance(eval_cfg, DictConfig):
        eval_cfg = OmegaConf.to_container(eval_cfg, resolve=True)
    if isinstance(amg_cfg, DictConfig):
        amg_cfg = OmegaConf.to_container(amg_cfg, resolve=True)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    sam = build_model(arch, checkpoint).to(dev).eval()
    predictor = sam_core.SamPredictor(sam)
    overrides = {k: v for k, v in dict(eval_cfg.get("amg") or {}).items() if v is not None}
    # The generator's own settings only: eval measures the generator, never amg.verifier.
    amg_kwargs = {**generator_kwargs(amg_cfg or {}), **overrides}
    generator = sam_core.SamAutomaticMaskGenerator(sam, **amg_kwargs)
    clicks = [int(c) for c in eval_cfg["clicks"]]
    thresholds = [float(t) for t in eval_cfg["iou_thresholds"]]
    rng = np.random.default_rng(0)
    click_rows, oracle_rows, box_rows, ceiling_rows, gt_best, pred_best = [], [], [], [], [], []
    low_res = int(sam.prompt_encoder.mask_input_size[0])
    images = 0
    t0 = time.perf_counter()
    for gt in ground_truth(eval_cfg):
        masks = gt.masks[gt.masks.reshape(len(gt.masks), -1).sum(1) > 0]
        if len(masks) == 0:
            continue
        images += 1
        predictor.set_image(gt.image)
        prompted = masks
        cap = int(eval_cfg["max_masks_per_image"])
        if len(prompted) > cap:  # prompted metrics on a sample; AMG sees every mask
            prompted = masks[np.sort(rng.choice(len(masks), cap, replace=False))]
        res = prompt_ious(predictor, prompted, max(clicks))
        click_rows.append(res["clicks"])
        oracle_rows.append(res["oracle1"])
        box_rows.append(res["box"])
        ceiling_rows.append(resolution_ceiling(prompted, low_res))
        g, p = amg_matches(generator.generate(gt.image), masks)
        gt_best.append(g)
        pred_best.append(p)
    if images == 0:
        raise ValueError("eval found no images with masks")
    click_iou = np.concatenate(click_rows)
    g, p = np.concatenate(gt_best), np.concatenate(pred_best)
    result: dict[str, Any] = {"model": checkpoint, "arch": arch, "source": eval_cfg["source"],
                              "images": images, "masks": int(len(click_iou))}
    for k in clicks:
        result[f"point_miou_{k}"] = float(click_iou[:, k - 1].mean())
    result["point_miou_1_oracle"] = float(np.concatenate(oracle_rows).mean())
    result["box_miou"] = float(np.concatenate(box_rows).mean())
    result["resolution_ceiling_miou"] = float(np.concatenate(ceiling_rows).mean())
    for t in thresholds:
        result[f"amg_recall_{t}"] = float((g >= t).mean())
        result[f"amg_precision_{t}"] = float((p >= t).mean()) if len(p) else 0.0
    result["amg_masks_per_image"] = float(len(p) / images)
    result["seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "eval.json").write_text(json.dumps(result, indent=2))
    print(format_table(result), flush=True)
    return result


def format_table(result: Mapping[str, Any]) -> str:
    rows = [(k, v) for k, v in result.items() if isinstance(v, float)]
    width = max(len(k) for k, _ in rows)
    head = f"eval of {result.get('model')} on {result.get('images')} {result.get('source')} images, {result.get('masks')} masks"
    return "\n".join([head] + [f"  {k:<{width}}  {v:8.4f}" for k, v in rows])


def run(cfg: DictConfig) -> dict:
    """Evaluates ``stage.checkpoint`` (a path or registered version; null: ``cfg.model``),
    as ``stage.arch``, else the architecture the version was registered with, else ``model.arch``."""
    stage = cfg.stage
    output = Path(cfg.output).resolve()
    spec = stage.checkpoint if stage.checkpoint is not None else cfg.model.get("checkpoint")
    checkpoint = resolve_model_path(spec, output)
    arch = stage.arch or registered_arch(checkpoint) or cfg.model.arch
    return evaluate_model(arch, checkpoint, stage, cfg.amg, output / stage.out_subdir,
                          device=cfg.model.get("device", "auto"))
