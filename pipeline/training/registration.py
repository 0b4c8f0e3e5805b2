"""Registering a trained model (any kind) from its last checkpoint: the folder layout is
``pipeline.models.registry``'s; what a training run adds to it is written here."""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.dataset.provenance import code_version
from pipeline.models import registry
from pipeline.training import checkpoints
from pipeline.training.plots import plot_history


def register(output: str, version: str, checkpoint_dir: str, cfg: DictConfig, stage: Mapping[str, Any],
             kind: str = registry.SAM, files: Mapping[str, bytes | str] | None = None,
             measure: Callable[[str], dict[str, Any]] | None = None, model_file: str = registry.MODEL_FILE,
             ) -> dict[str, Any]:
    """Registers the checkpoint in ``checkpoint_dir`` as ``kind``'s ``version`` under
    ``output``: its model file as ``model_file`` (``registry.TUNED_FILE`` for an adapter
    model), with ``files`` (e.g. data.json, detector.json) beside it.

    ``stage``: the settings the workers trained with (user paths resolved), recorded as
    ``stage`` in config.yaml. ``measure(folder)``, when given, measures the registered
    model before it counts as registered; the keys it returns go to the summary.
    Returns the summary, also written as train_summary.json (last): version, path (the
    folder), model (its model file), steps, complete (all ``stage.steps`` done),
    final_loss (mean of the last 20 steps), seconds_per_step (median), and measure's keys.
    """
    target = registry.version_dir(output, version, kind)
    storage.writable(target)
    registry.unregister(target)
    fs, root = storage.filesystem(target)
    src_fs, src = storage.filesystem(storage.join(checkpoint_dir, registry.MODEL_FILE))
    with storage.atomic_open(fs, storage.join(root, model_file)) as out, src_fs.open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            out.write(block)
    state = checkpoints.load(checkpoint_dir, checkpoints.TRAIN_STATE_FILE)
    history = state["history"]
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["stage"] = dict(stage)
    saved["code_version"] = code_version()
    registry.write(target, registry.CONFIG_FILE, OmegaConf.to_yaml(saved))
    for name, data in (files or {}).items():
        registry.write(target, name, data)
    registry.write(target, "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    if history:
        registry.write(target, storage.join("figures", "training.png"), plot_history(history))
    tail = history[-min(len(history), 20):]
    summary: dict[str, Any] = {
        "version": version,
        "path": target,
        "model": storage.join(target, model_file),
        "steps": int(state["step"]),
        "complete": int(state["step"]) >= int(stage["steps"]),
        "final_loss": float(np.mean([h["loss"] for h in tail])) if tail else math.nan,
        "seconds_per_step": float(np.median([h["seconds"] for h in history])) if history else math.nan,
    }
    if measure is not None:
        summary.update(measure(target))
    registry.mark_registered(target, summary)
    return summary
