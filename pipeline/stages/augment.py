"""``+stage=augment``: fill-in augmentation, a dataset with masks and categories -> a new
dataset of backgrounds with objects pasted onto them.

    python -m pipeline.run +stage=augment input=<dataset> output=<dataset> [stage.backgrounds=<images>]

The paste plan (which objects onto which background, balanced by category:
``pipeline.masks.paste_plan``) is made at the first start and recorded in the output with the
input's categories; each output image is then made by the worker's ``paste`` mask source
(``pipeline.masks.paste``: transform, blend, occlusion), the way every annotating stage runs
(``pipeline.execution.driver``: lease, identity check, plan, exactly once). The summary adds the
category histogram against the requested balance; ``<output>/augment_preview.jpg`` shows
the first images with pasted objects outlined. COCO: ``+stage=export_coco input=<output>``.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.dataset import listing as dataset
from pipeline.dataset import manifest
from pipeline.dataset.plan import Plan
from pipeline.execution import driver
from pipeline.masks import paste, paste_plan

log = logging.getLogger(__name__)

IDENTITY = ("input", "stage.backgrounds", "stage.seed", "stage.copies", "stage.objects_per_image", "stage.balance",
            "stage.favour_small", "stage.min_instance_area", "stage.max_instance_fraction", "stage.paste",
            "stage.image", "stage.keep_sa1b_ids")
PREVIEW_FILE = "augment_preview.jpg"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the stage; returns the summary of ``pipeline.execution.driver.run`` plus ``augment``
    (see ``report``)."""
    stage, output, source = cfg.stage, str(cfg.output), str(cfg.input)
    container = OmegaConf.to_container(cfg, resolve=True)
    recorded = paste_plan.read(output)
    categories = dataset.read_categories(source) or [paste_plan.DEFAULT_CATEGORY]
    the_plan = recorded or paste_plan.make(source, stage.backgrounds, categories, container["stage"])

    def prepare(out: str) -> None:
        if paste_plan.read(out) is None:
            paste_plan.write(out, the_plan)
            dataset.write_categories(out, categories)

    job = driver.Job(
        name="augment",
        source={"kind": "paste", "output": output, "paste": container["stage"]["paste"], "seed": stage.seed,
                "jpeg_quality": stage.image.jpeg_quality},
        model_sha256=_models(source),
        identity=IDENTITY,
        prepare=prepare,
        report=lambda out, plan: {"augment": report(out, plan, the_plan, int(stage.preview_images))},
    )
    return driver.run(cfg, the_plan.entries(), job)


def _models(source: str) -> str:
    """The masks' models: those of the input dataset's manifest (its masks are pasted)."""
    if not dataset.is_dataset(source):
        return ""
    return ",".join(sorted({str(h) for h in manifest.read_table(source).column("model_sha256").to_pylist() if h}))


def report(output: str, plan: Plan, the_plan: paste_plan.PastePlan, preview_images: int) -> dict[str, Any]:
    """The output's category histogram against the plan, over the whole dataset.

    Keys: images, pasted (objects pasted), planned (objects the plan pastes onto the
    images made), background_masks (the backgrounds' own masks kept), hidden (those
    dropped under pasted objects), histogram (category id -> masks), target (category id
    -> share, empty without balance), shares (category id -> share of the histogram),
    preview (the grid's URL, or None when the dataset has no image yet).
    """
    planned_per_image = Counter(p["name"] for p in the_plan.pastes)
    histogram: Counter = Counter()
    pasted = kept = images = planned = 0
    ok = {r["key"] for r in manifest.read_table(output).to_pylist() if r["status"] == manifest.STATUS_OK}
    name_of = {item.key: item.name for unit in plan.units for item in unit.items}
    samples = []
    for sample in dataset.iter_samples(output, images=True):
        images += 1
        annotations = sample.record["annotations"]
        histogram.update(int(a.get("category_id", 1)) for a in annotations)
        pasted += sum(a.get("box_source") == "pasted" for a in annotations)
        kept += sum(a.get("box_source") != "pasted" for a in annotations)
        if len(samples) < preview_images:
            samples.append(sample)
    for key in ok:
        planned += planned_per_image.get(name_of.get(key, ""), 0)
    brought_by_name = {o["name"]: o["background_masks"] or 0 for o in the_plan.outputs}
    brought = sum(brought_by_name.get(name_of.get(key, ""), 0) for key in ok)
    total = sum(histogram.values()) or 1
    result = {
        "images": images, "pasted": pasted, "planned": planned, "background_masks": kept,
        "hidden": brought - kept, "histogram": dict(sorted(histogram.items())),
        "target": dict(sorted(the_plan.target.items())),
        "shares": {c: round(n / total, 4) for c, n in sorted(histogram.items())},
        "preview": None,
    }
    if samples:
        fs, root = storage.filesystem(output)
        with storage.atomic_open(fs, storage.join(root, PREVIEW_FILE)) as f:
            f.write(paste.preview_grid(samples))
        result["preview"] = storage.url(fs, storage.join(root, PREVIEW_FILE))
    log.info("augment: %d images, %d objects pasted (%d planned), %d background masks kept, %d hidden; "
             "category shares %s (target %s)", images, pasted, planned, kept, result["hidden"],
             result["shares"], result["target"] or "none")
    return result

