"""The fully automatic stage: every input image -> SA-1B-style shards, exactly once.

    python -m pipeline.run +stage=fully_auto input=<images> output=<dir>

Everything that can be checked without a worker (the input exists and holds images,
the checkpoint exists) is checked before anything is written. Then the run goes the
way of every annotating stage (``pipeline.execution.driver``): the output's lease, the identity
check against the output's recorded settings, the plan, and the units not yet
committed on a pool of actors, each asking SAM's point grid for masks
(``pipeline.masks.sources.GridSource``). Rerunning the same command after any crash
finishes the dataset exactly once.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from pipeline.dataset.listing import write_categories
from pipeline.execution import driver
from pipeline.execution.driver import SUMMARY_FILE  # noqa: F401  (the loop reads a round's summary by it)
from pipeline.inputs import box_files
from pipeline.models.detector import detector_identity
from pipeline.models.loader import model_identity
from pipeline.models.verifier import verifier_identity

log = logging.getLogger(__name__)

# What defines a dataset: a resumed run must agree on these (pipeline.dataset.provenance).
IDENTITY = ("input", "model.arch", "model_sha256", "verifier_sha256", "detector_sha256", "boxes_sha256", "amg",
            "stage.image", "stage.keep_sa1b_ids")  # image has privacy
# Batching, memory and time limits: the same masks either way.
IDENTITY_IGNORES = ("amg.points_per_batch", "amg.max_mask_memory_mb", "stage.image.read_timeout_s",
                    "stage.image.decode_timeout_s")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the stage; returns (and saves as ``summary.json``) the run's summary (keys:
    ``pipeline.execution.driver.run``)."""
    entries = driver.list_inputs(cfg)
    model_sha256 = model_identity(cfg.model.checkpoint)
    verifier_sha256 = verifier_identity(cfg.amg.get("verifier"))  # the mask verifier, when amg.verifier is set
    detector_sha256 = boxes = None
    if cfg.amg.get("prompting") == "objects":
        detector, box_file = cfg.amg.objects.detector, cfg.amg.objects.get("boxes")
        if (detector is None) == (box_file is None):
            raise ValueError("amg.prompting=objects needs one source of boxes: amg.objects.detector=<output>/models/"
                             "detector_<version> (semi_auto or +stage=detector registers one) or "
                             "amg.objects.boxes=<COCO JSON | YOLO labels folder | Parquet>")
        if detector is not None:
            detector_sha256 = detector_identity(str(detector))
        else:
            boxes = box_files.load(str(box_file))
            log.info("amg.objects.boxes: %d box(es); images it does not name get adaptive points only",
                     boxes.table.num_rows)
    container = OmegaConf.to_container(cfg, resolve=True)
    job = driver.Job(
        name="fully_auto",
        source={"kind": "grid", "model": container["model"], "amg": container["amg"], "model_sha256": model_sha256,
                "verifier_sha256": verifier_sha256, "detector_sha256": detector_sha256, "output": str(cfg.output)},
        model_sha256=model_sha256,
        identity=IDENTITY,
        identity_ignores=IDENTITY_IGNORES,
        recorded={"model_sha256": model_sha256, "verifier_sha256": verifier_sha256,
                  "detector_sha256": detector_sha256, "boxes_sha256": boxes.sha256 if boxes else None},
        prepare=_box_table(boxes, entries) if boxes else None,
    )
    return driver.run(cfg, entries, job)


def _box_table(boxes: box_files.Boxes, entries: list) -> Callable[[str], None]:
    """The driver's prepare step for a box file: its rows under the input's names
    (boxes.parquet, rewritten at each start) and its categories as the dataset's."""
    def prepare(out: str) -> None:
        box_files.write_table(out, boxes, box_files.match(boxes, entries))
        write_categories(out, boxes.categories)
    return prepare

