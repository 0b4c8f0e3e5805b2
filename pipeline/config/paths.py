"""The user paths of a configuration, made absolute once, on the driver.

Stages hand paths to Ray workers whose working directory is not the user's (Ray Train
workers run in a session directory), and record them in the dataset's ``config.yaml``,
so every path a user gives is made absolute here, against the directory the command was
run from, before any stage sees it: ``pipeline.stages.run_stage`` resolves the root
config, ``pipeline.compose.settings.derive`` every config a composing stage derives.
Nothing else in the pipeline calls ``user_path``.

Which keys are paths is said here, per stage (``STAGE_PATHS``, dotted keys relative to
the stage's config). Stage configs nested in another (retrain's ``eval``, semi_auto's
``detector``, loop's and engine's sub-stages) are found by their ``name`` and resolved
with their own keys. Model specs (``MODEL_SPECS``) may name a version registered under
the output instead of a file: a bare name that is no file here is kept as it is, for
``pipeline.models.registry.resolve_model`` to look up.
"""
from __future__ import annotations

import os
import posixpath
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from pipeline.paths import user_path

ROOT_PATHS = ("input", "output", "amg.verifier")
ROOT_MODEL_SPECS = ("model.checkpoint",)
STAGE_PATHS: dict[str, tuple[str, ...]] = {
    "annotate": ("decoder_cache",),
    "augment": ("backgrounds",),
    "box_prompts": ("boxes",),
    "detector": ("data.datasets", "model.backbone_weights"),
    "eval": ("shards", "coco.annotations", "coco.image_dir"),
    "retrain": ("data.shards", "data.coco.annotations", "data.coco.image_dir"),
    "semi_auto": ("masks",),
    "verifier": ("decisions",),
}
MODEL_SPECS: dict[str, tuple[str, ...]] = {
    "eval": ("checkpoint",),
    "retrain": ("init_checkpoint",),
    "loop": ("init_checkpoint",),
    "engine": ("init_checkpoint",),
}


def model_spec_path(spec: Any) -> Any:
    """A model spec made absolute, unless it is a bare name that is no file here (a
    registered version, looked up under the output later) or a URL."""
    if spec is None:
        return None
    spec = str(spec)
    if "/" not in spec and os.sep not in spec and not os.path.exists(spec):
        return spec
    return user_path(spec)


def resolve_paths(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with every user path made absolute (``user_path``); values that
    cannot be resolved yet (Hydra's run directory outside a Hydra run) are left alone."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in ROOT_PATHS:
            _update(cfg, key, user_path)
        for key in ROOT_MODEL_SPECS:
            _update(cfg, key, model_spec_path)
        stage = cfg.get("stage")
        if isinstance(stage, DictConfig):
            _resolve_stage(stage)
    return cfg


def _resolve_stage(node: DictConfig) -> None:
    name = node.get("name")
    for key in STAGE_PATHS.get(name, ()):
        _update(node, key, user_path)
    for key in MODEL_SPECS.get(name, ()):
        _update(node, key, model_spec_path)
    for key in node:
        child = node._get_node(key)  # noqa: SLF001  no resolution of unrelated values
        if isinstance(child, DictConfig) and "name" in child:
            _resolve_stage(child)


def _update(node: DictConfig, key: str, resolve: Callable[[Any], Any]) -> None:
    value = OmegaConf.select(node, key, throw_on_resolution_failure=False)
    if value is None:
        return
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    resolved = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
    OmegaConf.update(node, key, resolved, merge=False)


# --- where a stage that reads a dataset writes ---------------------------------------
def output_given(cfg: DictConfig) -> bool:
    """Whether the user chose ``output=``: on the command line, or by composing a config
    with a non-null output. Hydra's default (its run directory) does not count."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except ValueError:  # composed, not launched: the config is what the caller chose
        return OmegaConf.select(cfg, "output", throw_on_resolution_failure=False) is not None
    return any(o.split("=", 1)[0].lstrip("+~") == "output" and not o.endswith("=null")
               for o in overrides)


def dataset_paths(cfg: DictConfig) -> tuple[str, str]:
    """(input dataset, output directory) of a stage that writes beside the dataset: the
    output is ``output=`` when given, else the dataset directory itself (the folder of
    the tar when the input is one SA-1B tar)."""
    if not cfg.get("input"):
        raise ValueError("input= must name a dataset directory (or an SA-1B tar)")
    dataset = str(cfg.input).rstrip("/")
    if output_given(cfg):
        return dataset, str(cfg.output).rstrip("/")
    return dataset, posixpath.dirname(dataset) if dataset.endswith(".tar") else dataset


def output_or_none(cfg: DictConfig) -> str | None:
    """``cfg.output``, or None when it is null or cannot resolve (a config composed
    outside a Hydra run has no ``${hydra:runtime.output_dir}``)."""
    output = OmegaConf.select(cfg, "output", throw_on_resolution_failure=False)
    return str(output).rstrip("/") if output else None

