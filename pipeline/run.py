"""Entry point: ``python -m pipeline.run +stage=<name> [input=...] [output=...]``.

Stages are looked up in an allow-list, never imported from a name taken verbatim
from the config, so a config cannot make us execute arbitrary code.
"""
from __future__ import annotations

import importlib
import logging
import subprocess
from functools import cache
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STAGES = {
    "fully_auto": "pipeline.stages.fully_auto",
    "stats": "pipeline.stages.stats",
    "validate": "pipeline.stages.validate",
    "export_coco": "pipeline.stages.export_coco",
    "retrain": "pipeline.stages.retrain",
    "eval": "pipeline.stages.eval",
    "loop": "pipeline.stages.loop",
}

log = logging.getLogger("pipeline")

# ${project_root:} lets configs name files shipped with the repository (sample images,
# the default model) independently of the working directory.
if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


@cache
def code_version() -> str:
    """The commit the code runs from (``-dirty`` with local edits), else the package
    version: recorded with every output so a dataset names the code that made it."""
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "sam-data-engine " + version("sam-data-engine")
        except PackageNotFoundError:
            return "unknown"


def run_stage(cfg: DictConfig) -> dict:
    """Runs the stage named by ``cfg.stage.name`` and returns its summary."""
    if "stage" not in cfg or "name" not in cfg.stage:
        raise ValueError(
            "no stage selected: add +stage=<name>, one of " + ", ".join(sorted(STAGES))
        )
    name = cfg.stage.name
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    module = importlib.import_module(STAGES[name])
    return module.run(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    summary = run_stage(cfg)
    if summary:
        log.info("%s finished: %s", cfg.stage.name, summary)


if __name__ == "__main__":
    main()
