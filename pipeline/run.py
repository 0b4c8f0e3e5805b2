"""Entry point: ``python -m pipeline.run +stage=<name> [input=...] [output=...]``.

Only the command line lives here; nothing imports this module (stages are dispatched
by ``pipeline.stages.run_stage``).
"""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from pipeline.stages import run_stage

log = logging.getLogger("pipeline")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    summary = run_stage(cfg)
    if summary:
        log.info("%s finished: %s", cfg.stage.name, summary)


if __name__ == "__main__":
    main()
