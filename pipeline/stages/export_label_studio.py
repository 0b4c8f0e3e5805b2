"""``+stage=export_label_studio``: an SA-1B-format dataset as Label Studio tasks with its
masks as predictions (editable brush regions), so a team reviews in the tool it already
uses; ``pipeline.dataset.label_studio`` converts.

Writes ``<output>/<folder>/`` with ``images/``, ``tasks.json`` and ``labeling_config.xml``,
each file atomically, the config last (its labels are known once every mask is read): a
folder with it is complete. The tasks point at their
images through ``stage.image_url_prefix``: by default Label Studio's local-files URL,
served when Label Studio runs with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<output>``; or any URL the images are served at.
Brush labels: the dataset's categories, and "object" for masks without one.
"""
from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from pipeline import storage
from pipeline.config.paths import dataset_paths
from pipeline.dataset.label_studio import UNLABELED, labeling_config, shard_tasks
from pipeline.dataset.listing import committed_shards, read_categories
from pipeline.execution.shard_map import map_shards

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Returns {"path" (tasks.json's URL), "tasks", "masks", "skipped"}."""
    dataset, output = dataset_paths(cfg)
    stage = cfg.stage
    fs, root = storage.filesystem(output)
    directory = storage.join(root, stage.folder)
    fs.makedirs(directory, exist_ok=True)
    categories = read_categories(str(dataset))
    names = {int(c["id"]): str(c["name"]) for c in categories or []}
    prefix = str(stage.image_url_prefix).replace("{folder}", str(stage.folder))
    tasks = masks = skipped = unlabeled = 0
    with storage.atomic_open(fs, storage.join(directory, "tasks.json")) as out:
        out.write(b"[\n")
        for part in map_shards(shard_tasks, committed_shards(dataset), parallel=stage.parallel,
                               min_shards_for_ray=stage.min_shards_for_ray, cluster=cfg.get("cluster"),
                               desc="export_label_studio", out_dir=storage.url(fs, directory), url_prefix=prefix,
                               names=names):
            for task in part.tasks:
                out.write((",\n" if tasks else "").encode() + json.dumps(task).encode())
                tasks += 1
            masks += part.masks
            unlabeled += part.unlabeled
            for key, reason in part.skipped:
                log.warning("skipped shard %s key %s: %s", part.shard, key, reason)
            skipped += len(part.skipped)
        out.write(b"\n]\n")
    labels = [names[k] for k in sorted(names)] + ([UNLABELED] if unlabeled or not names else [])
    with storage.atomic_open(fs, storage.join(directory, "labeling_config.xml")) as f:
        f.write(labeling_config(labels).encode())
    url = storage.url(fs, storage.join(directory, "tasks.json"))
    print(f"export_label_studio: {tasks} tasks, {masks} masks as predictions -> {url}"
          + (f"; {skipped} records skipped (each logged with its shard and key)" if skipped else ""))
    return {"path": url, "tasks": tasks, "masks": masks, "skipped": skipped}
