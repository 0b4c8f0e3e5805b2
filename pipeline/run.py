"""Entry point: ``python -m pipeline.run +stage=<name> [input=...] [output=...]``.

Only the command line lives here; nothing imports this module (stages are dispatched
by ``pipeline.stages.run_stage``).

The command line is checked (``pipeline.config.guard``) before ``hydra.main`` sees it:
Hydra configures logging and instantiates ``hydra.callbacks`` before the task function
runs, so a check inside ``main`` would come too late.
"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from pipeline.config.guard import ConfigRefused, check_command_line
from pipeline.stages import run_stage

log = logging.getLogger("pipeline")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    summary = run_stage(cfg)
    if summary:
        log.info("%s finished: %s", cfg.stage.name, summary)


if __name__ == "__main__":
    try:
        check_command_line(sys.argv[1:])
    except Exception as exc:  # noqa: BLE001  fail closed: what was not checked does not run
        # A command line that does not compose would fail in Hydra the same way.
        sys.exit(f"pipeline.run: {exc}" if isinstance(exc, ConfigRefused) else
                 f"pipeline.run: the command line does not compose: {type(exc).__name__}: {exc}")
    main()
