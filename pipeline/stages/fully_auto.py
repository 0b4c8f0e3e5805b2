"""The fully automatic stage: every input image -> SA-1B-style shards, exactly once.

    python -m pipeline.run +stage=fully_auto input=<images> output=<dir>

Everything that can be checked without a worker (the input exists and holds images,
the checkpoint exists) is checked before any work starts. Units already committed by
an earlier run (their manifest part exists) are skipped, so rerunning the same command
after any crash finishes the dataset without duplicating anything.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import ray
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pipeline import cluster, manifest, shards, storage
from pipeline.annotator import INFLIGHT_DIR, Annotator, inflight_key
from pipeline.model import model_identity
from pipeline.provenance import code_version
from pipeline.scheduler import Outcome, UnitScheduler
from pipeline.sources import Unit, enumerate_input, split_units

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the stage; returns (and saves as ``summary.json``) the run's summary.

    Summary keys: units (total), units_skipped (committed before), units_committed,
    units_failed, images, images_ok, images_failed, masks (this run), wall_s (whole run),
    annotate_s (models loaded to last unit committed), images_per_s and masks_per_s (over
    annotate_s), actors (per actor: units, images, masks, busy_s, images_per_s, restarts),
    isolated (keys isolated as poison inputs), dataset (totals over the whole manifest).
    """
    start = time.perf_counter()
    output = str(cfg.output)
    units = split_units(enumerate_input(str(cfg.input), exclude=output), cfg.stage.images_per_unit)
    model_sha256 = model_identity(cfg.model.checkpoint)
    _prepare_output(output, cfg)
    committed = manifest.committed_units(output)
    todo = [u for u in units if u.index not in committed]
    log.info(
        "%d images in %d units; %d units already committed, %d to do",
        sum(len(u.items) for u in units), len(units), len(units) - len(todo), len(todo),
    )

    outcome = Outcome()
    if todo:
        started = cluster.connect(cfg.cluster)
        try:
            outcome = _annotate(cfg, todo, model_sha256)
        finally:
            if started:
                ray.shutdown()
        _remove_leftovers(output)

    summary = _summary(units, len(units) - len(todo), outcome, time.perf_counter() - start, output)
    fs, root = storage.filesystem(output)
    with storage.atomic_open(fs, storage.join(root, SUMMARY_FILE)) as f:
        f.write(json.dumps(summary, indent=2).encode("utf-8"))
    log.info(
        "done: %d images (%d ok, %d failed, %d isolated), %d masks in %.1f s: %.2f images/s, "
        "%.1f masks/s; %d units committed, %d skipped, %d failed; per actor images/s: %s",
        summary["images"], summary["images_ok"], summary["images_failed"], len(summary["isolated"]),
        summary["masks"], summary["annotate_s"], summary["images_per_s"], summary["masks_per_s"],
        summary["units_committed"], summary["units_skipped"], summary["units_failed"],
        [a["images_per_s"] for a in summary["actors"]],
    )
    if outcome.failed:
        raise RuntimeError(
            f"{len(outcome.failed)} unit(s) failed after all retries (rerun the same command to "
            f"retry them): {outcome.failed}"
        )
    return summary


def _prepare_output(output: str, cfg: DictConfig) -> None:
    fs, root = storage.filesystem(output)
    for directory in (shards.SHARDS_DIR, manifest.MANIFEST_DIR, manifest.ERRORS_DIR):
        fs.makedirs(storage.join(root, directory), exist_ok=True)
    _remove_leftovers(output)
    config = storage.join(root, CONFIG_FILE)
    if fs.exists(config):
        previous = OmegaConf.create(fs.cat_file(config).decode("utf-8"))
        for group in ("model", "amg", "stage"):
            if OmegaConf.to_container(previous.get(group)) != OmegaConf.to_container(cfg[group], resolve=True):
                log.warning(
                    "%s settings differ from the previous run into %s; units committed before keep "
                    "theirs (the manifest records each image's model_sha256)", group, output,
                )
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["code_version"] = code_version()
    with storage.atomic_open(fs, config) as f:
        f.write(OmegaConf.to_yaml(saved).encode("utf-8"))


def _remove_leftovers(output: str) -> None:
    """Deletes what killed workers left: temporary files and careful tries' notes.

    Called only while no worker of this output runs: before any starts, after all stop.
    """
    fs, root = storage.filesystem(output)
    if fs.exists(storage.join(root, INFLIGHT_DIR)):
        fs.rm(storage.join(root, INFLIGHT_DIR), recursive=True)
    for directory in (shards.SHARDS_DIR, manifest.MANIFEST_DIR, manifest.ERRORS_DIR):
        removed = storage.remove_temps(fs, storage.join(root, directory))
        if removed:
            log.info("removed %d unfinished file(s) in %s/ left by killed workers", removed, directory)


def _annotate(cfg: DictConfig, todo: list[Unit], model_sha256: str) -> Outcome:
    stage = cfg.stage
    size = cluster.pool_size(stage, len(todo))
    remote = ray.remote(Annotator).options(**size.options())
    container = OmegaConf.to_container(cfg, resolve=True)

    def spawn():
        return remote.remote(
            model_cfg=container["model"],
            amg_cfg=container["amg"],
            image_cfg=container["stage"]["image"],
            output=str(cfg.output),
            model_sha256=model_sha256,
            prefetch=stage.prefetch,
            threads=None if size.num_gpus else int(size.num_cpus),
            kill_on=tuple(stage.fault_injection.kill_worker_on),
        )

    counts = {"masks": 0, "failed": 0}

    def on_progress(images: int, masks: int, failed: int) -> None:
        counts["masks"] += masks
        counts["failed"] += failed
        bar.update(images)
        elapsed = max(bar.format_dict["elapsed"], 1e-9)
        bar.set_postfix(masks_s=f"{counts['masks'] / elapsed:.1f}", failed=counts["failed"], refresh=False)

    log.info("starting %d annotator actor(s), %s CPU and %s GPU each", size.actors, size.num_cpus, size.num_gpus)
    scheduler = UnitScheduler(
        spawn,
        actors=size.actors,
        units_in_flight_per_actor=stage.units_in_flight_per_actor,
        max_unit_retries=stage.max_unit_retries,
        max_image_crashes=stage.max_image_crashes,
        placement_timeout_s=stage.placement_timeout_s,
        on_progress=on_progress,
        suspect=lambda unit: inflight_key(str(cfg.output), unit.index),
    )
    try:
        scheduler.wait_ready()
        # Created once the models are loaded, so images/s measures annotation only.
        with tqdm(total=sum(len(u.items) for u in todo), unit="img", desc="fully_auto", dynamic_ncols=True) as bar:
            return scheduler.run(todo)
    finally:
        scheduler.close()


def _summary(units: list[Unit], skipped: int, outcome: Outcome, wall: float, output: str) -> dict[str, Any]:
    images = sum(c["images"] for c in outcome.committed)
    masks = sum(c["masks"] for c in outcome.committed)
    failed = sum(c["errors"] for c in outcome.committed)
    table = manifest.read_table(output)
    statuses = table.column("status").to_pylist()
    return {
        "units": len(units),
        "units_skipped": skipped,
        "units_committed": len(outcome.committed),
        "units_failed": len(outcome.failed),
        "images": images,
        "images_ok": images - failed,
        "images_failed": failed,
        "masks": masks,
        "wall_s": round(wall, 3),
        "annotate_s": round(outcome.seconds, 3),
        "images_per_s": round(images / outcome.seconds, 3) if outcome.seconds else 0.0,
        "masks_per_s": round(masks / outcome.seconds, 3) if outcome.seconds else 0.0,
        "actors": [
            {
                "units": a.units,
                "images": a.images,
                "masks": a.masks,
                "busy_s": round(a.seconds, 3),
                "images_per_s": round(a.images / a.seconds, 3) if a.seconds else 0.0,
                "restarts": a.restarts,
            }
            for a in outcome.actors
        ],
        "isolated": sorted(outcome.poisoned),
        "dataset": {
            "images": len(statuses),
            "images_ok": statuses.count(manifest.STATUS_OK),
            "masks": sum(table.column("num_masks").to_pylist()),
        },
    }
