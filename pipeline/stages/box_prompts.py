"""``+stage=box_prompts``: a detector's boxes -> instance masks, as an SA-1B dataset.

    python -m pipeline.run +stage=box_prompts input=<images> stage.boxes=<box file> output=<dataset>

(a box file: a COCO instances JSON, a YOLO labels folder or a Parquet table.)

The box file is read and matched to the input's images on the driver
(``pipeline.inputs.box_files``: the matching rule and what is reported), recorded in the output
(``boxes.parquet``, ``categories.json``), and every named image is annotated the way
every annotating stage runs (``pipeline.execution.driver``: lease, identity check, plan, exactly
once): one image embedding per image, all its boxes in one decoder batch
(``pipeline.masks.sources.BoxSource``), optionally refined (``stage.refine_boxes``).
Each mask record carries its box's category, score and the box used. The COCO JSON of
the result comes from ``+stage=export_coco input=<dataset>`` (categories included).

The summary adds, over the whole dataset: how the box file matched the input, how
many boxes gave masks, how many refinement replaced, and, where the box file carries
each box's segmentation (ground truth), the masks' mIoU against it, overall and by
object size (COCO's small / medium / large, in stored pixels).
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.dataset import listing as dataset
from pipeline.dataset import manifest, plan
from pipeline.execution import driver
from pipeline.inputs import box_files
from pipeline.inputs.entries import InputError
from pipeline.models.loader import model_identity

log = logging.getLogger(__name__)

IDENTITY = ("input", "model.arch", "model_sha256", "boxes_sha256", "stage.prompt", "stage.refine_boxes",
            "stage.refine", "stage.image", "stage.privacy", "stage.keep_sa1b_ids")
IDENTITY_IGNORES = ("stage.prompt.boxes_per_batch",)  # batching: same masks
SIZES = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, float("inf")))  # COCO's
EXAMPLES = 5


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the stage; returns the summary of ``pipeline.execution.driver.run`` plus ``boxes``
    (the matching and the masks made, see ``report``)."""
    if not cfg.stage.boxes:
        raise InputError("box_prompts needs stage.boxes=<COCO instances JSON | YOLO labels folder | Parquet table>")
    boxes = box_files.load(str(cfg.stage.boxes))
    entries = driver.list_inputs(cfg)
    matching = box_files.match(boxes, entries)
    _warn(boxes, matching)
    if not matching.entries:
        raise InputError(
            f"stage.boxes={cfg.stage.boxes} names none of the {len(entries)} images of input={cfg.input} "
            f"(it names e.g. {matching.missing[:EXAMPLES]}; the input has e.g. "
            f"{[e.name for e in entries[:EXAMPLES]]}): see pipeline/inputs/box_files.py for the matching rule"
        )
    model_sha256 = model_identity(cfg.model.checkpoint)
    container = OmegaConf.to_container(cfg, resolve=True)
    output = str(cfg.output)
    prompt = {**container["stage"]["prompt"],
              "refine": {"enabled": bool(cfg.stage.refine_boxes), **container["stage"]["refine"]}}

    def prepare(out: str) -> None:
        # Rewritten at every start (the identity check has made sure it is the same box
        # file): an input that grew since is matched again, and no worker runs yet.
        box_files.write_table(out, boxes, matching)
        dataset.write_categories(out, boxes.categories)

    job = driver.Job(
        name="box_prompts",
        source={"kind": "boxes", "model": container["model"], "model_sha256": model_sha256, "output": output,
                "prompt": prompt},
        model_sha256=model_sha256,
        identity=IDENTITY,
        identity_ignores=IDENTITY_IGNORES,
        recorded={"model_sha256": model_sha256, "boxes_sha256": boxes.sha256},
        prepare=prepare,
        report=lambda out, the_plan: {"boxes": report(out, the_plan, boxes, matching)},
    )
    return driver.run(cfg, matching.entries, job)


def _warn(boxes: box_files.Boxes, matching: box_files.Matching) -> None:
    if matching.unnamed:
        log.warning("%d input image(s) are not named by the box file and are not annotated: %s",
                    len(matching.unnamed), _examples([e.name for e in matching.unnamed]))
    if matching.missing:
        log.warning("%d image(s) of the box file are not in the input (not annotated): %s",
                    len(matching.missing), _examples(matching.missing))
    if boxes.invalid:
        log.warning("%d box(es) of the box file cannot prompt and are skipped: %s",
                    len(boxes.invalid), _examples(boxes.invalid))
    if boxes.crowd:
        log.info("%d crowd box(es) skipped (they prompt groups, not objects)", boxes.crowd)


def _examples(names: list[str]) -> str:
    return ", ".join(names[:EXAMPLES]) + (" ..." if len(names) > EXAMPLES else "")


def report(output: str, the_plan: plan.Plan, boxes: box_files.Boxes, matching: box_files.Matching) -> dict[str, Any]:
    """What the box file gave and what the dataset made of it (the whole dataset).

    Keys: images_named (input images the file names), images_not_named (count,
    examples), without_boxes (named images with no box, kept with no mask: count,
    examples), not_in_input (file images not in the input: count, examples), invalid
    (boxes that cannot prompt: count, examples), crowd (skipped), given (boxes of the
    annotated images), masks, outside_image (boxes with no area inside their image, no
    mask), refined (boxes replaced by their mask's extent), gt (where the file has each
    box's segmentation: masks, miou, and per size small/medium/large: masks, miou).
    """
    given = Counter({name: sum(r["x0"] is not None for r in rows)
                     for name, rows in box_files.read_table(output).items()})
    empty = sorted(name for name in given if not given[name])
    name_of = {item.key: item.name for unit in the_plan.units for item in unit.items}
    ok = {r["key"] for r in manifest.read_table(output).to_pylist() if r["status"] == manifest.STATUS_OK}
    masks = refined = boxes_given = 0
    gt_iou: list[float] = []
    gt_area: list[int] = []
    for sample in dataset.iter_samples(output, images=False):
        annotations = sample.record["annotations"]
        masks += len(annotations)
        refined += sum(a.get("box_source") == "mask" for a in annotations)
        for a in annotations:
            if "gt_iou" in a:
                gt_iou.append(a["gt_iou"])
                gt_area.append(a["gt_area"])
    for key in ok:
        boxes_given += given.get(name_of.get(key, ""), 0)
    result: dict[str, Any] = {
        "images_named": len(matching.entries),
        "images_not_named": {"count": len(matching.unnamed), "examples": [e.name for e in matching.unnamed[:EXAMPLES]]},
        "without_boxes": {"count": len(empty), "examples": empty[:EXAMPLES]},
        "not_in_input": {"count": len(matching.missing), "examples": matching.missing[:EXAMPLES]},
        "invalid": {"count": len(boxes.invalid), "examples": boxes.invalid[:EXAMPLES]},
        "crowd": boxes.crowd,
        "given": boxes_given,
        "masks": masks,
        "outside_image": boxes_given - masks,
        "refined": refined,
    }
    if empty:
        log.info("%d image(s) named by the box file have no box: kept with no mask (%s)", len(empty), _examples(empty))
    if gt_iou:
        iou, area = np.asarray(gt_iou), np.asarray(gt_area)
        result["gt"] = {"masks": len(iou), "miou": round(float(iou.mean()), 4)}
        for name, low, high in SIZES:
            chosen = iou[(area >= low) & (area < high)]
            result["gt"][name] = {"masks": len(chosen), "miou": round(float(chosen.mean()), 4) if len(chosen) else None}
        log.info("box-prompted masks against the box file's segmentations: mIoU %.4f over %d masks (%s)",
                 result["gt"]["miou"], len(iou),
                 ", ".join(f"{n} {result['gt'][n]['miou']} ({result['gt'][n]['masks']})" for n, _, _ in SIZES))
    return result
