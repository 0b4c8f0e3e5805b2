"""What the stages that compose other stages (``loop``, ``engine``) share: deriving a
sub-stage's config from theirs, the model they start from, and naming the settings a
resumed run must keep."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.config.compare import differences as changed
from pipeline.config.compare import flatten
from pipeline.config.paths import resolve_paths
from pipeline.models import registry

# Settings that decide how or when a sub-stage runs, not what it makes (matched by their
# last dotted part): a cut run may be resumed with other values, e.g. on other hardware.
RUN_CONTROL = frozenset({
    "stop_at_step", "log_every", "checkpoint_every", "keep_checkpoints", "max_failures", "use_gpu",
    "cpus_per_worker", "bf16", "num_actors", "cpus_per_actor", "units_in_flight_per_actor", "prefetch",
    "max_unit_retries", "max_image_crashes", "placement_timeout_s", "fault_injection", "lease_ttl_s",
    "output_lease_ttl_s", "host", "port", "token", "lookahead", "embedding_cache", "browser_threads",
    "decoder_cache", "stop_after_images", "boxes_per_batch", "points_per_batch",
})


def derive(cfg: DictConfig, sub: str, **values: Any) -> DictConfig:
    """The root config with ``stage`` replaced by ``cfg.stage[sub]`` and ``values`` set
    (dotted keys allowed), its user paths made absolute, as if that stage had been run
    from the command line."""
    derived = cfg.copy()
    with open_dict(derived):
        derived.stage = OmegaConf.to_container(cfg.stage[sub], resolve=False)
        for key, value in values.items():
            OmegaConf.update(derived, key, value, merge=False, force_add=True)
    return resolve_paths(derived)


def start_model(cfg: DictConfig, output: str, stage: str) -> str:
    """The model a composing stage starts from: ``stage.init_checkpoint`` (a path or a
    version registered under ``output``), else ``model.checkpoint``."""
    spec = cfg.stage.init_checkpoint if cfg.stage.init_checkpoint is not None else cfg.model.checkpoint
    model = registry.resolve_model(spec, output, "start model")
    if model is None:
        raise ValueError(f"the {stage} needs a start model: stage.init_checkpoint=<path or registered version>")
    return model


def settings(values: dict[str, Any], per_run: tuple[str, ...] = ()) -> dict[str, Any]:
    """``values`` flattened, without run control and without the keys starting with
    ``per_run`` (those the composing stage sets itself)."""
    return {k: v for k, v in flatten(values).items()
            if k.rsplit(".", 1)[-1] not in RUN_CONTROL and not k.startswith(per_run or ("\0",))}


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per leaf that differs: ``key: <then> then, <now> now``."""
    return [f"{k}: {then!r} then, {current!r} now" for k, then, current in changed(before, now)]


def shown(lines: list[str], limit: int = 10) -> str:
    return "; ".join(lines[:limit]) + (f"; ... ({len(lines)} in all)" if len(lines) > limit else "")
