"""``+stage=semi_auto``: a box detector pre-fills the confident masks of every image.

    python -m pipeline.run +stage=semi_auto input=<images> output=<queue dataset> stage.masks=<datasets>

SAM's data engine, stage 2: a class-agnostic detector trained on the boxes of the masks
collected so far (``stage.masks``; settings ``stage.detector``, trained and registered by
``pipeline.training.detector`` under ``<output>/models/``: a rerun finds the same version)
proposes boxes; the confident ones prompt SAM (one embedding, all boxes in one decoder
batch), and the confident masks are written, each marked automatic, as an SA-1B dataset
that ``+stage=annotate`` opens pre-filled. It runs the way every annotating stage runs
(``pipeline.execution.driver``: lease, identity check, plan, exactly once); the detector's identity
is part of the dataset's.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.execution import driver
from pipeline.inputs.entries import InputError
from pipeline.models.detector import detector_identity
from pipeline.models.loader import model_identity
from pipeline.models.verifier import verifier_identity
from pipeline.training.detector import train

IDENTITY = ("input", "model.arch", "model_sha256", "detector_sha256", "verifier_sha256", "amg.verifier",
            "amg.verifier_precision", "stage.prompt", "stage.image", "stage.privacy", "stage.keep_sa1b_ids")
IDENTITY_IGNORES = ("stage.prompt.boxes_per_batch",)  # batching: same masks


def run(cfg: DictConfig) -> dict[str, Any]:
    """Returns ``pipeline.execution.driver.run``'s summary plus detector (the training summary)
    and prefilled_masks_per_image (over the whole dataset)."""
    if not cfg.stage.masks:
        raise InputError("semi_auto needs stage.masks=<the datasets collected so far> to train its detector")
    entries = driver.list_inputs(cfg)  # before any training
    model_sha256 = model_identity(cfg.model.checkpoint)
    verifier_sha256 = verifier_identity(cfg.amg.get("verifier"))
    settings = cfg.stage.detector.copy()
    with open_dict(settings):
        settings.data.datasets = cfg.stage.masks
    trained = train(cfg, settings)
    if not trained["complete"]:
        raise RuntimeError(f"detector {trained['version']} stopped at step {trained['steps']} "
                           "(stage.detector.stop_at_step): rerun to finish its training first")
    detector_sha256 = detector_identity(trained["path"])
    container = OmegaConf.to_container(cfg, resolve=True)
    job = driver.Job(
        name="semi_auto",
        source={"kind": "detector", "model": container["model"], "model_sha256": model_sha256,
                "detector": trained["path"], "detector_sha256": detector_sha256,
                "prompt": container["stage"]["prompt"], "amg": container["amg"], "verifier_sha256": verifier_sha256},
        model_sha256=model_sha256,
        identity=IDENTITY,
        identity_ignores=IDENTITY_IGNORES,
        recorded={"model_sha256": model_sha256, "detector_sha256": detector_sha256,
                  "verifier_sha256": verifier_sha256},
    )
    summary = driver.run(cfg, entries, job)
    totals = summary["dataset"]
    summary["detector"] = trained
    summary["prefilled_masks_per_image"] = totals["masks"] / totals["images_ok"] if totals["images_ok"] else 0.0
    print(f"semi_auto: {summary['prefilled_masks_per_image']:.1f} masks per image pre-filled by detector "
          f"{trained['version']} (box AP {trained['eval']['box_ap']:.3f} on held-out masks)", flush=True)
    return summary
