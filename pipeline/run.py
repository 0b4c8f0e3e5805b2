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


SECRETS = ("stage.token",)  # never written to a file: Hydra's record of the run gets a placeholder


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    redact_hydra_record(cfg, SECRETS)
    summary = run_stage(cfg)
    if summary:
        log.info("%s finished: %s", cfg.stage.name, summary)
    # The last line a person reads: where the result is (the default output is Hydra's run
    # folder, whose name they could not have guessed).
    print(f"{cfg.stage.name}: output in {cfg.output}", flush=True)


def redact_hydra_record(cfg: DictConfig, keys: tuple[str, ...]) -> None:
    """Replaces the values of ``keys`` wherever they stand in the files Hydra wrote to the
    run folder (``.hydra/``: the configuration, the overrides, the job's dirname): with
    the default output, that folder is the dataset, and a secret there would travel with it."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    secrets = {str(v) for key in keys
               if (v := OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)) is not None}
    hydra_cfg = HydraConfig.get()
    if not secrets or not hydra_cfg.output_subdir:
        return
    for path in (Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir).glob("*.yaml"):
        text = path.read_text()
        redacted = text
        for secret in secrets:
            redacted = redacted.replace(secret, REDACTED)
        if redacted != text:
            path.write_text(redacted)


REDACTED = "<redacted>"


if __name__ == "__main__":
    try:
        check_command_line(sys.argv[1:])
    except Exception as exc:  # noqa: BLE001  fail closed: what was not checked does not run
        # A command line that does not compose would fail in Hydra the same way.
        sys.exit(f"pipeline.run: {exc}" if isinstance(exc, ConfigRefused) else
                 f"pipeline.run: the command line does not compose: {type(exc).__name__}: {exc}")
    main()
