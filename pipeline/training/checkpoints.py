"""Checkpoint folders of a training run (SAM or detector), locally or in an object store.

    <output>/train_runs/<run>/checkpoint_%08d/
        model.pth        the model's weights: its state dict (SAM's in the official format),
                         or, tuned with adapters or LoRA, only its tuned tensors and base
        train_state.pt   optimizer, scheduler, step, history (and what the loop adds)
        complete.json    {"step": N}, written last: only a folder that has it is trusted

Ray Train uploads a folder's files in no particular order, so a run killed during an
upload can leave a folder with a truncated ``model.pth``; ``upload`` writes the files
one by one and the marker after them, and ``latest`` ignores folders without one.
Everything loads with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import re
import tempfile
from typing import Any, Iterator

import torch

from pipeline import storage
from pipeline.models.registry import MODEL_FILE
from pipeline.paths import is_url

TRAIN_STATE_FILE = "train_state.pt"
COMPLETE_FILE = "complete.json"
FILES = (MODEL_FILE, TRAIN_STATE_FILE)  # what a checkpoint holds besides its marker
_NAME = re.compile(r"checkpoint_(\d{8})$")


def folder_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def write_local(directory: str, weights: dict[str, Any], state: dict[str, Any]) -> None:
    """Writes a checkpoint's files (not its marker) into a local folder, for ``upload``."""
    torch.save(weights, os.path.join(directory, MODEL_FILE))
    torch.save(state, os.path.join(directory, TRAIN_STATE_FILE))


def state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """``model``'s weights on the CPU, detached, in its family's released format (SAM 2's
    with the video tensors it was loaded with): what a checkpoint stores of a model, and
    what the official packages load."""
    from sam_core.checkpoint import official_state

    return official_state(model)


def report(step: int, weights: dict[str, Any] | None, state: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
    """Reports step ``step`` to Ray Train with a checkpoint of ``weights`` (what the model
    file holds) and ``state`` (rank 0), or without one (other ranks: pass None),
    uploaded by ``upload``."""
    import ray.train

    if weights is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_local(tmp, weights, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=folder_name(step), checkpoint_upload_fn=upload)


def upload(checkpoint, dir_name: str):
    """Ray Train's ``checkpoint_upload_fn``: copies the files of a local checkpoint into
    the run's storage one by one, then writes the completion marker; returns the
    persisted ``ray.train.Checkpoint``."""
    import pyarrow.fs
    import ray.train

    run = ray.train.get_context().get_storage()
    fs = run.storage_filesystem
    dest = posixpath.join(run.experiment_fs_path, dir_name)
    fs.create_dir(dest)
    for name in FILES:
        pyarrow.fs.copy_files(os.path.join(checkpoint.path, name), posixpath.join(dest, name),
                              source_filesystem=checkpoint.filesystem, destination_filesystem=fs)
    step = int(_NAME.match(dir_name).group(1))
    with fs.open_output_stream(posixpath.join(dest, COMPLETE_FILE)) as f:
        f.write(json.dumps({"step": step}).encode())
    return ray.train.Checkpoint(dest, filesystem=fs)


@contextlib.contextmanager
def resumed(resume_from: str | None) -> Iterator[str | None]:
    """The folder a worker resumes from: Ray's own checkpoint (a restarted worker, or a
    run Ray restores from its snapshot) wins over ``resume_from`` (found in storage by the
    driver), else None. ``as_directory`` reads a local checkpoint in place and cleans up a
    downloaded one; ``to_directory`` would leave a copy in /tmp every time."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield resume_from
        return
    with checkpoint.as_directory() as folder:
        yield folder


def latest(run_url: str) -> str | None:
    """The complete checkpoint folder with the highest step under ``run_url`` (a path
    or URL, as given), or None."""
    fs, root = storage.filesystem(run_url)
    if not fs.isdir(root):
        return None
    best, best_step = None, -1
    for path in fs.ls(root, detail=False):
        name = posixpath.basename(path.rstrip("/"))
        match = _NAME.match(name)
        if match is None or not fs.isfile(storage.join(path, COMPLETE_FILE)):
            continue
        step = int(match.group(1))
        if step > best_step:
            best, best_step = storage.join(run_url, name), step
    return best


def load(folder: str, name: str, device: str | torch.device = "cpu") -> Any:
    """``folder/name`` (``MODEL_FILE`` or ``TRAIN_STATE_FILE``) read with weights_only."""
    path = storage.join(folder, name)
    if not is_url(path):
        return torch.load(path, map_location=device, weights_only=True)
    fs, inner = storage.filesystem(path)
    return torch.load(io.BytesIO(fs.cat_file(inner)), map_location=device, weights_only=True)
