"""Registered models: ``<output>/models/<version>/``, on a local disk or in an object store.

    model.pth            the Sam state dict (official format: sam_core and segment_anything load it)
    config.yaml          the resolved configuration it was trained with (+ code_version)
    data.json            the shards, synthetic and COCO settings it was trained on
    history.jsonl        one line of training metrics per step
    figures/training.png the training curve
    eval.json            held-out evaluation (when evaluated)
    train_summary.json   written last: the version is registered once it exists

A model is named by a version (looked up under an output) or by a path or URL.
``config.yaml`` is read as plain YAML: nothing in a registered file is interpolated or
resolved (``${oc.env:...}`` stays a string), so a version cannot read the environment.
"""
from __future__ import annotations

import json
import math
import posixpath
import re
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.dataset.provenance import code_version
from pipeline.paths import user_path
from pipeline.training import checkpoints
from pipeline.training.plots import plot_history

MODELS_DIR = "models"
MODEL_FILE = checkpoints.MODEL_FILE
CONFIG_FILE = "config.yaml"
EVAL_FILE = "eval.json"
SUMMARY_FILE = "train_summary.json"
_VERSION = re.compile(r"v\d{3}$")


def version_url(output: str, version: str) -> str:
    return storage.join(output, MODELS_DIR, version)


def next_version(output: str) -> str:
    """The first free name of v001, v002, ... under ``<output>/models/``."""
    fs, root = storage.filesystem(storage.join(output, MODELS_DIR))
    taken = ({posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
             if fs.isdir(root) else set())
    n = 1
    while f"v{n:03d}" in taken:
        n += 1
    return f"v{n:03d}"


def resolve_model(spec: str | None, output: str, what: str = "checkpoint") -> str | None:
    """The state dict ``spec`` names: a version registered under ``<output>/models/``,
    else a path (made absolute against the working directory) or a URL. None stays None."""
    if spec is None:
        return None
    spec = str(spec)
    registered = storage.join(version_url(output, spec), MODEL_FILE)
    if "/" not in spec and _exists(registered):
        return registered
    path = user_path(spec)
    if not _exists(path):
        raise FileNotFoundError(
            f"{what} {spec!r} is neither a file nor a version registered in {storage.join(output, MODELS_DIR)}"
        )
    return path


def registered_arch(checkpoint: str | None) -> str | None:
    """The architecture a registered version was trained as (``stage.arch`` of its
    config.yaml), else None: a version trained at another input size than ``model.arch``
    evaluates as itself."""
    if checkpoint is None or posixpath.basename(checkpoint) != MODEL_FILE:
        return None
    config = read_config(posixpath.dirname(checkpoint))
    arch = ((config or {}).get("stage") or {}).get("arch")
    return arch if isinstance(arch, str) else None


def read_config(version_dir: str) -> dict[str, Any] | None:
    """A version's config.yaml as plain data (``yaml.safe_load``: no resolvers, no tags)."""
    fs, path = storage.filesystem(storage.join(version_dir, CONFIG_FILE))
    try:
        return yaml.safe_load(fs.cat_file(path))
    except FileNotFoundError:
        return None


def register(output: str, version: str, checkpoint_dir: str, cfg: DictConfig,
             stage: dict[str, Any], data_files: list[str]) -> dict[str, Any]:
    """Registers the checkpoint in ``checkpoint_dir`` as ``<output>/models/<version>/``.

    ``stage``: the settings the workers trained with (user paths resolved). Returns the
    training summary, also written as train_summary.json: version, model (its URL),
    steps, complete (all ``stage.steps`` done), final_loss (mean of the last 20 steps),
    seconds_per_step (median).
    """
    target = version_url(output, version)
    fs, root = storage.writable(target)
    # Figures of an earlier registration of this version describe another model.
    for stale in (SUMMARY_FILE, EVAL_FILE):
        if fs.exists(storage.join(root, stale)):
            fs.rm(storage.join(root, stale))
    src_fs, src = storage.filesystem(storage.join(checkpoint_dir, MODEL_FILE))
    with storage.atomic_open(fs, storage.join(root, MODEL_FILE)) as out, src_fs.open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            out.write(block)
    state = checkpoints.load(checkpoint_dir, checkpoints.TRAIN_STATE_FILE)
    history = state["history"]
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["stage"] = stage
    saved["code_version"] = code_version()
    storage.write_bytes(storage.join(target, CONFIG_FILE), OmegaConf.to_yaml(saved).encode())
    storage.write_json(storage.join(target, "data.json"), {
        "shards": data_files, "synthetic": stage["data"]["synthetic"], "coco": stage["data"]["coco"],
    })
    storage.write_bytes(storage.join(target, "history.jsonl"),
                        "".join(json.dumps(h) + "\n" for h in history).encode())
    if history:
        storage.write_bytes(storage.join(target, "figures", "training.png"), plot_history(history))
    tail = history[-min(len(history), 20):]
    summary = {
        "version": version,
        "model": storage.join(target, MODEL_FILE),
        "steps": state["step"],
        "complete": state["step"] >= int(stage["steps"]),
        "final_loss": float(np.mean([h["loss"] for h in tail])) if tail else math.nan,
        "seconds_per_step": float(np.median([h["seconds"] for h in history])) if history else math.nan,
    }
    storage.write_json(storage.join(target, SUMMARY_FILE), summary)
    return summary


def read_summary(output: str, version: str) -> dict[str, Any] | None:
    """train_summary.json of a registered version, or None when it is not registered."""
    return storage.read_json(storage.join(version_url(output, version), SUMMARY_FILE))


def _exists(url: str) -> bool:
    fs, path = storage.filesystem(url)
    return fs.isfile(path)
