"""Stage ``retrain``: trains or fine-tunes a sam_core model with Ray Train.

    python -m pipeline.run +stage=retrain [output=DIR|URL] [stage.steps=N] [stage.data.shards=DIR]

One ``TorchTrainer`` worker per GPU (DDP, bf16 autocast) or one CPU worker locally
(``pipeline.training``). Data: synthetic scenes, SA-1B shards (filtered by predicted
IoU and stability) and COCO instance files, alone or mixed (``pipeline.truth.ground_truth``).
Checkpoints go to ``<output>/train_runs/<version>/``; rerunning the same version
resumes from the last complete one. The finished model is registered as
``<output>/models/<version>/`` (``pipeline.models.registry``) and evaluated on held-out
ground truth (``pipeline.models.evaluation``). Output may be a local path or an fsspec URL.
"""
from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from pipeline import storage
from pipeline.dataset.listing import committed_shards
from pipeline.models import registry
from pipeline.models.evaluation import evaluate_model
from pipeline.training.registration import register
from pipeline.training.trainer import train_to_checkpoint, worker_config
from pipeline.training.worker import train_loop_per_worker

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Trains, registers and (when ``stage.eval.enabled``) evaluates a model.

    Returns the registry's training summary: version, model (URL of the registered
    state dict), steps, complete (False when ``stop_at_step`` ended it early),
    final_loss (mean of the last 20 steps), seconds_per_step (median), and eval (the
    evaluation's result) when evaluated.
    """
    stage = cfg.stage
    output = str(cfg.output)
    storage.writable(output)
    config = worker_config(stage)
    version = stage.version or registry.next_version(output)
    config["init_checkpoint"] = registry.resolve_model(stage.init_checkpoint, output, "init checkpoint")
    data_files = committed_shards(config["data"]["shards"]) if config["data"]["shards"] else []
    final = train_to_checkpoint(train_loop_per_worker, config, output, version, cfg.cluster)
    data = {"shards": data_files, "synthetic": config["data"]["synthetic"], "coco": config["data"]["coco"]}
    summary = register(output, version, final, cfg, config, files={"data.json": json.dumps(data, indent=2)})
    if stage.eval.enabled:
        summary["eval"] = evaluate_model(
            arch=stage.arch, checkpoint=summary["model"], eval_cfg=stage.eval, amg_cfg=cfg.amg,
            out_dir=summary["path"], device=cfg.model.device,
        )
    log.info("registered %s: %s", version, summary)
    return summary
