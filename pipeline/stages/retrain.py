"""Stage ``retrain``: trains or fine-tunes a sam_core model with Ray Train.

    python -m pipeline.run +stage=retrain [output=DIR|URL] [stage.tune=decoder] [stage.data.shards=DIR]
        [stage.data.coco.annotations=JSON stage.data.coco.image_dir=DIR] [stage.init_checkpoint=MODEL]

One ``TorchTrainer`` worker per GPU (DDP, bf16 autocast) or one CPU worker locally
(``pipeline.training``). What trains is ``stage.tune`` (decoder, decoder_prompt,
adapter, lora, full; each with its own steps and learning rate). Data: synthetic
scenes, SA-1B shards (filtered by predicted IoU and stability) and COCO instance
files, alone or mixed (``pipeline.truth.ground_truth``), less a held-out share of the
annotated images. Checkpoints go to ``<output>/train_runs/<version>/``; rerunning the
same version resumes from the last complete one. The finished model is registered as
``<output>/models/<version>/`` (``pipeline.models.registry``) after the promotion gate
measured it against the model it started from (``gate``), and evaluated on held-out
ground truth (``pipeline.models.evaluation``). Output may be a local path or an fsspec URL.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.dataset.filters import MaskFilter
from pipeline.dataset.listing import committed_shards
from pipeline.dataset.shards import iter_shard
from pipeline.models import registry
from pipeline.models.evaluation import NoImages, evaluate_model
from pipeline.models.loader import model_identity
from pipeline.training.registration import register
from pipeline.training.stream import synthetic_enabled
from pipeline.training.trainer import train_to_checkpoint, worker_config
from pipeline.training.worker import train_loop_per_worker, tune_spec, tuned_base

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Trains, gates, registers and (when ``stage.eval.enabled``) evaluates a model.

    Returns the registry's training summary: version, path, model (URL of the registered
    model file), steps, complete (False when ``stop_at_step`` ended it early),
    final_loss (mean of the last 20 steps), seconds_per_step (median), gate (the
    promotion gate's figures, ``gate``), promoted, and eval (the evaluation's result)
    when evaluated.
    """
    stage = cfg.stage
    output = str(cfg.output)
    storage.writable(output)
    config = worker_config(stage)
    version = stage.version or registry.next_version(output)
    init = registry.resolve_model(stage.init_checkpoint, output, "init checkpoint")
    spec = tune_spec(config)
    if spec.mode != "full" and init is None:
        raise ValueError(f"stage.tune={spec.mode} fine-tunes a model: give it one with stage.init_checkpoint=")
    base, _ = tuned_base(init, spec)
    config.update(init_checkpoint=init, base_sha256=model_identity(base) if base else None)
    data_files = committed_shards(config["data"]["shards"]) if config["data"]["shards"] else []
    config["data"]["holdout_fraction"] = holdout_fraction(config["data"], data_files)
    check_mask_filter(config["data"], data_files)
    log.info("retrain %s: tune %s from %s, %d steps of %d images, lr %g (%s)", version, spec.mode, init or "scratch",
             config["steps"], config["batch_size"], config["optim"]["lr"], _data_line(config["data"], data_files))

    final = train_to_checkpoint(train_loop_per_worker, config, output, version, cfg.cluster)
    data = {"shards": data_files, "synthetic": config["data"]["synthetic"], "coco": config["data"]["coco"]}
    summary = register(output, version, final, cfg, config, files={"data.json": json.dumps(data, indent=2)},
                       model_file=_model_name(spec),
                       measure=lambda folder: gate(cfg, config, init, storage.join(folder, _model_name(spec))))
    if not summary["promoted"]:
        log.warning("%s is worse than the model it started from (%s): registered, not promoted; go on with %s",
                    version, _gate_line(summary["gate"]), init)
    if stage.eval.enabled:
        summary["eval"] = evaluate_model(
            arch=stage.arch, checkpoint=summary["model"], eval_cfg=stage.eval, amg_cfg=cfg.amg,
            out_dir=summary["path"], device=cfg.model.device,
        )
    log.info("registered %s: %s", version, summary)
    return summary


FILTER_SAMPLE_SHARDS = 20  # the filter's share is counted on at most this many shards
FILTER_WARN_SHARE = 0.1    # a filter that keeps less than this share of the masks warns


def check_mask_filter(data: dict[str, Any], shards: list[str]) -> dict[str, int]:
    """Counts the shards' masks the data filter keeps (on the first FILTER_SAMPLE_SHARDS
    shards) and says so: a warning with the numbers and the settings when it keeps less
    than FILTER_WARN_SHARE of them, an error when it keeps none and nothing else trains.
    Returns {"masks", "kept"}."""
    if not shards:
        return {"masks": 0, "kept": 0}
    masks = MaskFilter.of(data)
    sample = shards[:FILTER_SAMPLE_SHARDS]
    for url in sample:
        for item in iter_shard(url, images=False):
            masks(item.record.get("annotations", []))
    total, kept = masks.kept + masks.dropped, masks.kept
    where = f"{len(sample)} of {len(shards)} shards" if len(sample) < len(shards) else f"{len(shards)} shard(s)"
    setting = (f"stage.data.pred_iou_thresh={data['pred_iou_thresh']}, "
               f"stage.data.stability_score_thresh={data['stability_score_thresh']}")
    log.info("retrain data: the mask filter (%s) keeps %d of the %d masks in %s", setting, kept, total, where)
    others = synthetic_enabled(data) or bool(data["coco"]["annotations"])
    if total and kept == 0 and not others:
        raise ValueError(f"the mask filter ({setting}) keeps none of the {total} masks in {where}: nothing to "
                         "train on. Lower or unset (null: keep what the dataset kept) those thresholds")
    if total and kept < FILTER_WARN_SHARE * total:
        log.warning("the mask filter (%s) keeps only %d of %d masks (%.1f%%) in %s; the dataset's own thresholds "
                    "are in its config.yaml (amg.*): set these to null to train on every mask it kept",
                    setting, kept, total, 100 * kept / total, where)
    return {"masks": total, "kept": kept}


MIN_HOLDOUT_IMAGES = 5  # fewer annotated images than this: all train (a share of them could be all of them)


def holdout_fraction(data: dict[str, Any], shards: list[str]) -> float:
    """``data.holdout_fraction``, or 0 when the annotated images are too few to hold a
    share out (counted from a few shards or the COCO file; many shards are never few)."""
    fraction = float(data["holdout_fraction"])
    if fraction <= 0 or (not shards and not data["coco"]["annotations"]):
        return fraction
    count = 0
    if len(shards) < MIN_HOLDOUT_IMAGES:
        count += sum(1 for url in shards for _ in iter_shard(url, images=False))
    else:
        count += MIN_HOLDOUT_IMAGES
    if data["coco"]["annotations"]:
        count += len(storage.read_json(data["coco"]["annotations"]).get("images", []))
    if count < MIN_HOLDOUT_IMAGES:
        log.info("%d annotated image(s): too few to hold any out; all train, and the gate measures on the other "
                 "held-out sets", count)
        return 0.0
    return fraction


def _model_name(spec) -> str:
    from sam_core.training import ENCODER_MODES

    return registry.TUNED_FILE if spec.mode in ENCODER_MODES else registry.MODEL_FILE


def _data_line(data: dict[str, Any], shards: list[str]) -> str:
    parts = []
    if synthetic_enabled(data):
        parts.append(f"synthetic {data['synthetic']['domain']} scenes")
    if shards:
        parts.append(f"{len(shards)} shard(s)")
    if data["coco"]["annotations"]:
        parts.append(f"COCO {data['coco']['annotations']}")
    holdout = float(data["holdout_fraction"])
    if (shards or data["coco"]["annotations"]) and holdout > 0:
        parts.append(f"{holdout:.0%} of their images held out for the gate")
    return ", ".join(parts)


def gate_sets(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The held-out sets the promotion gate measures on, by name, as eval configs: the
    held-out share of the training shards and of the COCO set, ``gate.coco`` whole, and
    last the synthetic eval scenes, measured only when none of the others has images."""
    data, gate_cfg = config["data"], config["gate"]
    base = {**config["eval"], "clicks": [1], "automatic": False, "num_images": int(gate_cfg["num_images"]),
            "pred_iou_thresh": data["pred_iou_thresh"], "stability_score_thresh": data["stability_score_thresh"]}
    holdout = float(data["holdout_fraction"])
    sets = {}
    if data["shards"] and holdout > 0:
        sets["shards"] = {**base, "source": "shards", "shards": data["shards"], "holdout_fraction": holdout}
    if data["coco"]["annotations"] and holdout > 0:
        sets["coco"] = {**base, "source": "coco", "coco": data["coco"], "holdout_fraction": holdout}
    if gate_cfg["coco"]["annotations"]:
        sets["gate_coco"] = {**base, "source": "coco", "coco": gate_cfg["coco"], "holdout_fraction": 0.0}
    sets["synthetic"] = {**base, "source": "synthetic"}  # measured only when no other set has images
    return sets


def gate(cfg: DictConfig, config: dict[str, Any], start: str | None, new: str) -> dict[str, Any]:
    """The promotion gate: ``new`` and ``start`` (the model it was tuned from) measured by
    ``gate.metric`` on each of ``gate_sets``; ``new`` is promoted unless it is worse than
    ``start`` by more than ``gate.tolerance`` on any. Returns {"gate": {metric, tolerance,
    sets: {name: {images, before, after}}, promoted}, "promoted"}; a model trained from
    scratch (no start) or with the gate off is promoted unmeasured."""
    gate_cfg = config["gate"]
    if not gate_cfg["enabled"] or start is None:
        return {"gate": {"enabled": bool(gate_cfg["enabled"]), "promoted": True}, "promoted": True}
    metric, tolerance = str(gate_cfg["metric"]), float(gate_cfg["tolerance"])
    arch, amg, device = config["arch"], OmegaConf.to_container(cfg.amg, resolve=True), cfg.model.device
    start_arch = registry.registered_arch(start) or arch
    sets, promoted = {}, True
    for name, eval_cfg in gate_sets(config).items():
        if name == "synthetic" and sets:
            break
        try:
            before = evaluate_model(start_arch, start, eval_cfg, amg, None, device=device)
        except NoImages as empty:  # e.g. a held-out share of a few images that came out empty
            log.info("promotion gate: no %s set (%s)", name, empty)
            continue
        after = evaluate_model(arch, new, eval_cfg, amg, None, device=device)
        if metric not in after:
            raise ValueError(f"stage.gate.metric={metric} is not an eval figure; one of "
                             f"{', '.join(k for k, v in after.items() if isinstance(v, float))}")
        sets[name] = {"images": after["images"], "masks": after["masks"], "before": before[metric],
                      "after": after[metric]}
        promoted = promoted and after[metric] >= before[metric] - tolerance
    result = {"metric": metric, "tolerance": tolerance, "start_model": start, "sets": sets, "promoted": promoted}
    return {"gate": result, "promoted": promoted}


def _gate_line(result: dict[str, Any]) -> str:
    return "; ".join(f"{name} {result['metric']} {s['after']:.3f} vs {s['before']:.3f}"
                     for name, s in result.get("sets", {}).items())
