"""Runs a mask source over an input into an SA-1B dataset, exactly once: how every
annotating stage (fully_auto, box_prompts, augment) runs.

A stage builds a ``Job`` (its mask source, the config fields that define its dataset,
its own inputs to record) and hands it to ``run`` with the input's entries. ``run``
takes the output's lease (one writer per output), checks that the output was made with
the same settings (or records them at the first run), lets the job record what it needs
in the output (``Job.prepare``), extends the output's plan with any new inputs and
annotates the units not yet committed on a pool of Ray actors (``pipeline.execution.worker``).
Units already committed (their manifest part exists) are skipped, so rerunning the
same command after any crash finishes the dataset exactly once.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import ray
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pipeline import storage
from pipeline.dataset import isolated, manifest, plan, shards
from pipeline.dataset.lease import Lease
from pipeline.dataset.plan import PlanError
from pipeline.dataset.provenance import record_or_check
from pipeline.execution import cluster
from pipeline.execution.scheduler import Outcome, UnitScheduler
from pipeline.execution.worker import INFLIGHT_DIR, UnitWorker, inflight_key
from pipeline.inputs import privacy
from pipeline.inputs.entries import Entry, Unit, enumerate_input
from pipeline.models.loader import model_family

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


@dataclass
class Job:
    """What an annotating stage asks of the driver.

    name: the stage's name (progress bar and logs).
    source: the workers' mask source spec (``pipeline.masks.sources.build``).
    model_sha256: identity of the model (or of whatever made the masks), written to
        every manifest row.
    identity: dotted config fields that define the dataset; a resumed run must agree on
        them (``pipeline.dataset.provenance``). identity_ignores: sub-keys of those that do not
        (e.g. batching). recorded: values added to the recorded config before the check
        (e.g. ``model_sha256``, a box file's sha256), named in ``identity`` to be compared.
    prepare(output): called holding the lease, after the identity check and before the
        plan is extended; records the stage's own inputs in the output (box tables,
        paste plans) so that every worker and every resume reads the same ones.
    report(output, plan): called after the run with the output's plan
        (``pipeline.dataset.plan.Plan``: every item's key and name); its keys are added to the summary.
    """

    name: str
    source: dict[str, Any]
    model_sha256: str
    identity: Sequence[str]
    identity_ignores: Sequence[str] = ()
    recorded: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[str], None] | None = None
    report: Callable[[str, plan.Plan], dict[str, Any]] | None = None


def list_inputs(cfg: DictConfig) -> list[Entry]:
    """The input's entries, listed on the driver before anything is written (an unusable
    input fails here), with the checks a run needs first: the privacy detectors load here,
    not as a failure of every unit on the workers."""
    entries = enumerate_input(str(cfg.input), exclude=str(cfg.output), follow_symlinks=cfg.stage.follow_symlinks)
    if cfg.stage.image.privacy.blur:
        privacy.check_available()
    return entries


def run(cfg: DictConfig, entries: list[Entry], job: Job) -> dict[str, Any]:
    """Annotates ``entries`` into ``cfg.output`` with ``job``; returns (and saves as
    ``summary.json``) the run's summary.

    ``cfg`` has its paths resolved (``pipeline.config.paths``); ``cfg.stage`` carries the run
    settings of conf/stage/fully_auto.yaml (units, actors, retries, lease, image).
    Summary keys: units (total), units_skipped (committed before), units_committed,
    units_failed, images, images_ok, images_failed, masks (this run), inputs_added (to
    the plan by this run), inputs_gone (in the plan, no longer in the input),
    images_per_unit, wall_s (whole run), annotate_s (models loaded to last unit
    committed), images_per_s and masks_per_s (over annotate_s), actors (per actor: units,
    images, masks, busy_s, images_per_s, restarts), isolated (keys isolated as poison
    inputs, this run and before), dataset (totals over the whole manifest), then the
    keys of ``job.report``.
    """
    start = time.perf_counter()
    output = str(cfg.output)
    stage = cfg.stage
    started_ray = False
    with Lease(output, ttl_s=stage.lease_ttl_s) as lease:
        try:
            _check_output(output, cfg, job)
            _remove_leftovers(output)
            if job.prepare is not None:
                job.prepare(output)
            size = plan.recorded_images_per_unit(output) or stage.images_per_unit
            if size is None:
                started_ray = cluster.connect(cfg.cluster)
                size = plan.auto_images_per_unit(
                    len(entries), cluster.pool_size(stage, len(entries)).actors, stage.units_per_actor,
                    stage.min_images_per_unit, stage.max_images_per_unit,
                )
            the_plan = plan.load_or_extend(output, entries, size, keep_sa1b_ids=stage.keep_sa1b_ids)
            units = the_plan.units
            committed = manifest.committed_units(output)
            todo = [u for u in units if u.index not in committed]
            log.info(
                "%d images in %d units of %d (%d added to the plan now, %d gone from the input); "
                "%d units already committed, %d to do",
                the_plan.items, len(units), the_plan.images_per_unit, the_plan.added, len(the_plan.gone),
                len(units) - len(todo), len(todo),
            )
            outcome = Outcome()
            if todo:
                started_ray = cluster.connect(cfg.cluster) or started_ray
                outcome = _annotate(cfg, todo, job, lease)
                _remove_leftovers(output)
        finally:
            if started_ray:
                ray.shutdown()

    summary = _summary(the_plan, len(units) - len(todo), outcome, time.perf_counter() - start, output)
    if job.report is not None:
        summary.update(job.report(output, the_plan))
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


def _check_output(output: str, cfg: DictConfig, job: Job) -> None:
    """Refuses to resume an output made otherwise; records the settings at its first run."""
    if manifest.committed_units(output) and plan.recorded_images_per_unit(output) is None:
        raise PlanError(
            f"{output} has committed units but no recorded plan: it was written by an older version "
            "of this project, whose image ids and keys differ. Write to a new output="
        )
    plan.check_images_per_unit(output, cfg.stage.images_per_unit)
    config = {**OmegaConf.to_container(cfg, resolve=True), **job.recorded}
    identity = tuple(job.identity)
    if "model" in job.source:
        # SAM 1 and SAM 2 masks never share a dataset: the family is recorded and compared.
        config["model_family"] = model_family(job.source["model"])
        identity += ("model_family",)
    record_or_check(output, config, identity, job.identity_ignores, allow_change=cfg.stage.allow_config_change)
    fs, root = storage.filesystem(output)
    for directory in (shards.SHARDS_DIR, manifest.MANIFEST_DIR, manifest.ERRORS_DIR):
        fs.makedirs(storage.join(root, directory), exist_ok=True)


def _remove_leftovers(output: str) -> None:
    """Deletes what killed writers left: temporary files and careful tries' notes.

    Called only while this run holds the output's lease and none of its workers runs:
    before any starts, after all stop. (A writer of an expired lease that still runs
    somewhere loses its temporaries, so it cannot commit them either.)
    """
    fs, root = storage.filesystem(output)
    if fs.exists(storage.join(root, INFLIGHT_DIR)):
        fs.rm(storage.join(root, INFLIGHT_DIR), recursive=True)
    for directory in ("", shards.SHARDS_DIR, manifest.MANIFEST_DIR, manifest.ERRORS_DIR, plan.PLAN_DIR,
                      isolated.ISOLATED_DIR):
        removed = storage.remove_temps(fs, storage.join(root, directory) if directory else root)
        if removed:
            log.info("removed %d unfinished file(s) in %s/ left by killed writers", removed, directory or ".")


def _annotate(cfg: DictConfig, todo: list[Unit], job: Job, lease: Lease) -> Outcome:
    stage = cfg.stage
    output = str(cfg.output)
    size = cluster.pool_size(stage, len(todo))
    remote = ray.remote(UnitWorker).options(**size.options())
    image_cfg = OmegaConf.to_container(stage.image, resolve=True)

    def spawn():
        return remote.remote(
            source=job.source,
            image_cfg=image_cfg,
            output=output,
            model_sha256=job.model_sha256,
            lease_owner=lease.owner,
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

    def on_isolate(key: str, unit: Unit, reason: str) -> None:
        source_of = next(i.source for i in unit.items if i.key == key)
        isolated.record(output, key, source_of, unit.index, reason)

    poisoned = {} if stage.retry_isolated else isolated.load(output)
    log.info(
        "parallelism: %d annotator actor(s) (%s CPU and %s GPU each) for %d unit(s)",
        size.actors, size.num_cpus, size.num_gpus, len(todo),
    )
    scheduler = UnitScheduler(
        spawn,
        actors=size.actors,
        units_in_flight_per_actor=stage.units_in_flight_per_actor,
        max_unit_retries=stage.max_unit_retries,
        max_image_crashes=stage.max_image_crashes,
        placement_timeout_s=stage.placement_timeout_s,
        on_progress=on_progress,
        suspect=lambda unit: inflight_key(output, unit.index),
        poisoned=poisoned,
        on_isolate=on_isolate,
        check=lease.check,
    )
    try:
        scheduler.wait_ready()
        # Created once the models are loaded, so images/s measures annotation only.
        with tqdm(total=sum(len(u.items) for u in todo), unit="img", desc=job.name, dynamic_ncols=True) as bar:
            return scheduler.run(todo)
    finally:
        scheduler.close()


def _summary(the_plan: plan.Plan, skipped: int, outcome: Outcome, wall: float, output: str) -> dict[str, Any]:
    units = the_plan.units
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
        "inputs_added": the_plan.added,
        "inputs_gone": len(the_plan.gone),
        "images_per_unit": the_plan.images_per_unit,
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
