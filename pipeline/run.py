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
    redact_hydra_record(SECRETS)
    summary = run_stage(cfg)
    if summary:
        log.info("%s finished: %s", cfg.stage.name, summary)


def redact_hydra_record(keys: tuple[str, ...]) -> None:
    """Replaces the values of ``keys`` in the files Hydra wrote to the run folder
    (``.hydra/config.yaml``, ``overrides.yaml``, ``hydra.yaml``): with the default output,
    that folder is the dataset, and a secret there would travel with it."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hydra_cfg = HydraConfig.get()
    if not hydra_cfg.output_subdir:
        return
    folder = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
    for name, overrides_at in (("config.yaml", None), ("overrides.yaml", ""), ("hydra.yaml", "hydra.overrides.task")):
        path = folder / name
        if not path.is_file():
            continue
        saved = OmegaConf.load(path)
        if overrides_at is None:  # the composed configuration
            for key in keys:
                if OmegaConf.select(saved, key, default=None) is not None:
                    OmegaConf.update(saved, key, REDACTED, merge=False)
        else:  # the command line's overrides, key=value strings
            listed = saved if overrides_at == "" else OmegaConf.select(saved, overrides_at, default=[])
            redacted = [_redacted(str(o), keys) for o in listed]
            if overrides_at == "":
                saved = OmegaConf.create(redacted)
            else:
                OmegaConf.update(saved, overrides_at, redacted, merge=False)
        path.write_text(OmegaConf.to_yaml(saved))


REDACTED = "<redacted>"


def _redacted(override: str, keys: tuple[str, ...]) -> str:
    name, sep, _ = override.partition("=")
    return f"{name}={REDACTED}" if sep and name.lstrip("+~") in keys else override


if __name__ == "__main__":
    try:
        check_command_line(sys.argv[1:])
    except Exception as exc:  # noqa: BLE001  fail closed: what was not checked does not run
        # A command line that does not compose would fail in Hydra the same way.
        sys.exit(f"pipeline.run: {exc}" if isinstance(exc, ConfigRefused) else
                 f"pipeline.run: the command line does not compose: {type(exc).__name__}: {exc}")
    main()
