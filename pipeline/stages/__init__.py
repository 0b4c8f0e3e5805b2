"""One module per stage; each exposes ``run(cfg) -> dict`` (a summary).

Stages are looked up in this allow-list, never imported from a name taken verbatim
from the config, and every configuration is checked by ``pipeline.config.guard``
before a stage runs, so a config cannot make us execute arbitrary code.
"""
from __future__ import annotations

import importlib

from omegaconf import DictConfig

from pipeline.config.guard import check_config
from pipeline.config.paths import resolve_paths

STAGES = {
    "fully_auto": "pipeline.stages.fully_auto",
    "stats": "pipeline.stages.stats",
    "validate": "pipeline.stages.validate",
    "export_coco": "pipeline.stages.export_coco",
    "retrain": "pipeline.stages.retrain",
    "eval": "pipeline.stages.eval",
    "loop": "pipeline.stages.loop",
    "annotate": "pipeline.stages.annotate",
    "detector": "pipeline.stages.detector",
    "verifier": "pipeline.stages.verifier",
    "semi_auto": "pipeline.stages.semi_auto",
    "box_prompts": "pipeline.stages.box_prompts",
    "augment": "pipeline.stages.augment",
    "engine": "pipeline.stages.engine",
}


def run_stage(cfg: DictConfig) -> dict:
    """Runs the stage named by ``cfg.stage.name`` with its user paths made absolute
    (``pipeline.config.paths``) and returns its summary; raises
    ``pipeline.config.guard.ConfigRefused`` for a configuration that names code to run."""
    check_config(cfg)
    if "stage" not in cfg or "name" not in cfg.stage:
        raise ValueError(
            "no stage selected: add +stage=<name>, one of " + ", ".join(sorted(STAGES))
        )
    name = cfg.stage.name
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    module = importlib.import_module(STAGES[name])
    return module.run(resolve_paths(cfg))
