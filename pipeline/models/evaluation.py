"""How good a model is on ground truth it was not trained on: the metrics of
``sam_core.metrics`` over the held-out images of ``pipeline.truth.ground_truth``.

Used by the eval stage, by retrain after training and by the loop after every round.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pipeline import storage
from pipeline.models import registry
from pipeline.models.loader import generator_kwargs, load_sam
from pipeline.truth.ground_truth import held_out


class NoImages(ValueError):
    """The held-out source has no image with a mask (e.g. an empty held-out share)."""


def _plain(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def evaluate_model(
    arch: str, checkpoint: str | None, eval_cfg: Mapping[str, Any] | DictConfig,
    amg_cfg: Mapping[str, Any] | DictConfig, out_dir: str | None, device: str = "auto",
) -> dict[str, Any]:
    """Evaluates ``checkpoint`` (path or URL) as ``arch`` with the settings ``eval_cfg``
    (conf/stage/eval.yaml) and the generator settings ``amg_cfg`` (with
    ``eval_cfg["amg"]``'s non-null values on top); writes ``out_dir/eval.json`` when
    ``out_dir`` (path or URL) is given, and prints a table.

    Returns a dict: model, arch, source, images, masks (prompted), point_miou_<k> for
    each configured click count, point_miou_1_oracle, box_miou, resolution_ceiling_miou,
    and, unless ``eval_cfg["automatic"]`` is false, amg_recall_<t> and amg_precision_<t>
    per IoU threshold and amg_masks_per_image; seconds.
    """
    import sam_core
    from sam_core.metrics import amg_matches, prompt_ious, resolution_ceiling

    eval_cfg, amg_cfg = _plain(eval_cfg), _plain(amg_cfg)
    sam = load_sam({"arch": arch, "checkpoint": checkpoint, "device": device})
    predictor = sam_core.SamPredictor(sam)
    overrides = {k: v for k, v in eval_cfg["amg"].items() if v is not None}
    # The generator's own settings only: eval measures the generator, never amg.verifier.
    generator = sam_core.SamAutomaticMaskGenerator(sam, **{**generator_kwargs(amg_cfg), **overrides})
    clicks = [int(c) for c in eval_cfg["clicks"]]
    thresholds = [float(t) for t in eval_cfg["iou_thresholds"]]
    cap = int(eval_cfg["max_masks_per_image"])
    rng = np.random.default_rng(0)
    low_res = int(sam.prompt_encoder.mask_input_size[0])
    click_rows, oracle_rows, box_rows, ceiling_rows, gt_best, pred_best = [], [], [], [], [], []
    images = 0
    t0 = time.perf_counter()
    automatic = bool(eval_cfg.get("automatic", True))
    progress = tqdm(held_out(eval_cfg), total=int(eval_cfg["num_images"]), desc=f"eval {eval_cfg['source']}",
                    unit="img", dynamic_ncols=True)
    for gt in progress:
        masks = gt.masks[gt.masks.reshape(len(gt.masks), -1).sum(1) > 0]
        if len(masks) == 0:
            continue
        images += 1
        predictor.set_image(gt.image)
        prompted = masks
        if len(prompted) > cap:  # prompted metrics on a sample; AMG sees every mask
            prompted = masks[np.sort(rng.choice(len(masks), cap, replace=False))]
        res = prompt_ious(predictor, prompted, max(clicks))
        click_rows.append(res["clicks"])
        oracle_rows.append(res["oracle1"])
        box_rows.append(res["box"])
        ceiling_rows.append(resolution_ceiling(prompted, low_res, square=sam.family == "sam2"))
        if automatic:
            g, p = amg_matches(generator.generate(gt.image), masks)
            gt_best.append(g)
            pred_best.append(p)
    if images == 0:
        raise NoImages(f"eval found no images with masks in its {eval_cfg['source']} source")
    click_iou = np.concatenate(click_rows)
    result: dict[str, Any] = {"model": checkpoint, "arch": arch, "source": eval_cfg["source"],
                              "images": images, "masks": int(len(click_iou))}
    for k in clicks:
        result[f"point_miou_{k}"] = float(click_iou[:, k - 1].mean())
    result["point_miou_1_oracle"] = float(np.concatenate(oracle_rows).mean())
    result["box_miou"] = float(np.concatenate(box_rows).mean())
    result["resolution_ceiling_miou"] = float(np.concatenate(ceiling_rows).mean())
    if automatic:
        g, p = np.concatenate(gt_best), np.concatenate(pred_best)
        for t in thresholds:
            result[f"amg_recall_{t}"] = float((g >= t).mean())
            result[f"amg_precision_{t}"] = float((p >= t).mean()) if len(p) else 0.0
        result["amg_masks_per_image"] = float(len(p) / images)
    result["seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        storage.write_json(storage.join(out_dir, registry.EVAL_FILE), result)
    print(format_table(result), flush=True)
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """The float metrics of an ``evaluate_model`` result, one per line."""
    rows = [(k, v) for k, v in result.items() if isinstance(v, float)]
    width = max(len(k) for k, _ in rows)
    head = (f"eval of {result.get('model')} on {result.get('images')} {result.get('source')} images, "
            f"{result.get('masks')} masks")
    return "\n".join([head] + [f"  {k:<{width}}  {v:8.4f}" for k, v in rows])

