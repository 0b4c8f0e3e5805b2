"""One module per stage; each exposes ``run(cfg) -> dict`` (a summary).

Stages are looked up in this allow-list, never imported from a name taken verbatim
from the config, and every configuration is checked by ``pipeline.config.guard``
before a stage runs, so a config cannot make us execute arbitrary code.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig

from pipeline.config.guard import check_config
from pipeline.config.paths import resolve_paths
from pipeline.models.download import ensure_checkpoint
from pipeline.paths import PROJECT_ROOT

STAGES = {
    "fully_auto": "pipeline.stages.fully_auto",
    "stats": "pipeline.stages.stats",
    "validate": "pipeline.stages.validate",
    "export_coco": "pipeline.stages.export_coco",
    "export_yolo": "pipeline.stages.export_yolo",
    "export_label_studio": "pipeline.stages.export_label_studio",
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

# Stages that do not read input=, and where their data goes instead: an input= given to
# them is refused rather than silently ignored.
NO_INPUT = {
    "retrain": "stage.data.shards=<dataset> or stage.data.coco.annotations=<json> stage.data.coco.image_dir=<dir>",
    "detector": "stage.data.datasets=<dataset>[,...]",
    "verifier": "its synthetic scenes (stage.synthetic.*) or stage.decisions=<table>",
    "engine": "stage.scenes.domain=... or stage.scenes.coco.annotations=<json> (the engine makes its own pools)",
}
DEFAULT_INPUT = PROJECT_ROOT / "sample" / "images"  # conf/config.yaml's: no input= given

# Stages that load cfg.model (the others never fetch it, e.g. validate with model=vit_h).
USES_MODEL = {"fully_auto", "eval", "loop", "annotate", "semi_auto", "box_prompts", "engine", "verifier"}


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
    cfg = resolve_paths(cfg)
    if name in NO_INPUT and "input" in cfg and Path(str(cfg.input)) != DEFAULT_INPUT:
        raise ValueError(f"{name} does not read input= (got {cfg.input}); its data: {NO_INPUT[name]}")
    if name in USES_MODEL and "model" in cfg:
        ensure_checkpoint(cfg.model)  # an official checkpoint not here yet: fetched into the cache
    return module.run(cfg)
