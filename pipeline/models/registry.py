"""Registered models: ``<output>/models/<name>/``, on a local disk or in an object store.

One registry for every kind of model the engine trains:

    kind       folder                            model files
    sam        models/<version>/                 model.pth (official state dict) or, tuned with
                                                 adapters or LoRA, adapter.pth (on a base); data.json
    detector   models/detector_<version>/        model.pth, detector.json (what rebuilds it)
    verifier   models/verifier_<version>/        model.pth, verifier.json

Each folder also holds ``config.yaml`` (the resolved configuration it was trained with,
plus code_version), and when trained by ``pipeline.training``: ``history.jsonl`` and
``figures/training.png``, ``eval.json`` (held-out figures). ``train_summary.json`` is
written last: a folder is registered once it exists. Versions are v001, v002, ...; the
composing stages name theirs (``round_001``, ``engine_1``).

A model is named by a version (looked up under an output) or by a path or URL.
``config.yaml`` is read as plain YAML: nothing in a registered file is interpolated or
resolved (``${oc.env:...}`` stays a string), so a version cannot read the environment.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from typing import Any, Sequence

import yaml

from pipeline import storage

MODELS_DIR = "models"
MODEL_FILE = "model.pth"
TUNED_FILE = "adapter.pth"  # a model tuned with adapters or LoRA: its tensors and its base's sha256
CONFIG_FILE = "config.yaml"
EVAL_FILE = "eval.json"
SUMMARY_FILE = "train_summary.json"  # written last: its presence registers the folder
SAM = "sam"


def version_dir(output: str, version: str, kind: str = SAM) -> str:
    """``<output>/models/<version>`` for SAM, ``<output>/models/<kind>_<version>`` else."""
    return storage.join(output, MODELS_DIR, version if kind == SAM else f"{kind}_{version}")


def next_version(output: str, kind: str = SAM) -> str:
    """The first free name of v001, v002, ... for ``kind`` under ``<output>/models/``."""
    fs, root = storage.filesystem(storage.join(output, MODELS_DIR))
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)} if fs.isdir(root) else set()
    prefix = "" if kind == SAM else f"{kind}_"
    taken = {int(m.group(1)) for n in names if (m := re.fullmatch(rf"{re.escape(prefix)}v(\d{{3,}})", n))}
    n = 1
    while n in taken:
        n += 1
    return f"v{n:03d}"


def model_file(output: str, version: str) -> str:
    """The model file of SAM version ``version`` registered under ``output``: its state
    dict, or its adapter file when it was tuned with adapters or LoRA."""
    folder = version_dir(output, version)
    full, tuned = storage.join(folder, MODEL_FILE), storage.join(folder, TUNED_FILE)
    return tuned if _exists(tuned) and not _exists(full) else full


def resolve_model(spec: str | None, output: str, what: str = "checkpoint") -> str | None:
    """The state dict ``spec`` names: a version registered under ``<output>/models/``, else
    a path or URL (made absolute by ``pipeline.config.paths``). None stays None."""
    if spec is None:
        return None
    spec = str(spec)
    registered = model_file(output, spec)
    if "/" not in spec and _exists(registered):
        fs, path = storage.filesystem(registered)
        refuse_links(fs, posixpath.dirname(path), [path], what)
        return registered
    if not _exists(spec):
        raise FileNotFoundError(
            f"{what} {spec!r} is neither a file nor a version registered in {storage.join(output, MODELS_DIR)}"
        )
    return spec


def registered_arch(checkpoint: str | None) -> str | None:
    """The architecture a registered SAM version was trained as (``stage.arch`` of its
    config.yaml), else None: a version trained at another input size than ``model.arch``
    evaluates as itself."""
    if checkpoint is None or posixpath.basename(checkpoint) not in (MODEL_FILE, TUNED_FILE):
        return None
    config = read_config(posixpath.dirname(checkpoint))
    arch = ((config or {}).get("stage") or {}).get("arch")
    return arch if isinstance(arch, str) else None


def read_config(directory: str) -> dict[str, Any] | None:
    """A registered folder's config.yaml as plain data (``yaml.safe_load``: no resolvers,
    no tags), or None."""
    fs, path = storage.filesystem(storage.join(directory, CONFIG_FILE))
    try:
        return yaml.safe_load(fs.cat_file(path))
    except FileNotFoundError:
        return None


def read_summary(directory: str) -> dict[str, Any] | None:
    """The summary of the registered folder ``directory``, or None when not registered."""
    return storage.read_json(storage.join(directory, SUMMARY_FILE))


def write(directory: str, name: str, data: bytes | str) -> None:
    """Writes ``directory/name`` atomically."""
    storage.write_bytes(storage.join(directory, name), data.encode("utf-8") if isinstance(data, str) else data)


def unregister(directory: str) -> None:
    """Removes the marker and the figures of an earlier registration of the folder:
    they describe another model than the one being registered now."""
    fs, root = storage.filesystem(directory)
    for stale in (SUMMARY_FILE, EVAL_FILE):
        if fs.exists(storage.join(root, stale)):
            fs.rm(storage.join(root, stale))


def mark_registered(directory: str, summary: dict[str, Any]) -> None:
    """Writes the folder's ``SUMMARY_FILE``: call it last."""
    write(directory, SUMMARY_FILE, json.dumps(summary, indent=2, default=str))


def read_files(path: str, names: Sequence[str], what: str) -> dict[str, bytes]:
    """The bytes of the files ``names`` of the registered folder at ``path`` (the
    folder, or one of those files in it), read once: check and load the same bytes."""
    fs, inner = storage.filesystem(path)
    folder = posixpath.dirname(inner) if posixpath.basename(inner) in names else inner
    refuse_links(fs, folder, [storage.join(folder, name) for name in names], what)
    try:
        return {name: fs.cat_file(storage.join(folder, name)) for name in names}
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{what} {path!r}: expected a folder with {', '.join(names)} (train one with +stage={what}; "
            f"it registers <output>/models/{what}_<version>/)"
        ) from None


def identity(files: dict[str, bytes]) -> str:
    """The sha256 that identifies a registered model made of several files."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}:{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return digest.hexdigest()


def check_identity(files: dict[str, bytes], expected_sha256: str | None, path: str) -> None:
    """Refuses files that are not the ones a run recorded (``expected_sha256``)."""
    if expected_sha256 is not None and identity(files) != expected_sha256:
        raise ValueError(f"{path}: its files changed after the run recorded them (sha256 {identity(files)}, "
                         f"expected {expected_sha256}); the dataset would mix two models")


def refuse_links(fs, folder: str, files: Sequence[str], what: str) -> None:
    """A registered folder is read as it is: a symbolic link in it (the folder or one of
    its files) could make a version read any file on the machine, so it is refused."""
    if not storage.is_local(fs):
        return
    for path in (folder, *files):
        if os.path.islink(path):
            raise ValueError(f"{what} {path}: a symbolic link ({os.readlink(path)}); registered model folders "
                             "hold their own files: copy the file in instead")


def _exists(url: str) -> bool:
    fs, path = storage.filesystem(url)
    return fs.isfile(path)
