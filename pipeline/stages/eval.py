"""Stage ``eval``: how good a model is, on ground truth it was not trained on.

    python -m pipeline.run +stage=eval [model=...] [stage.checkpoint=VERSION|PATH|URL] [output=DIR|URL]

Metrics (SAM paper protocol where it has one; ``sam_core.metrics``):
- point mIoU after 1 and k clicks: the first click at the point of the object farthest
  from its boundary, each next one at the same spot of the largest error region
  (positive on a miss, negative on a spill), the previous low-res logits as mask prompt.
  With one click the answer is the candidate with the highest predicted IoU; the
  oracle (best of three) is reported too.
- box mIoU: the tight ground-truth box, single-mask output.
- automatic generation: recall (ground-truth masks matched) and precision (generated
  masks matching) at IoU 0.5 and 0.75.
- resolution ceiling: the mIoU a perfect answer at the model's mask resolution would
  get on the prompted masks; no prompted metric of this architecture can pass it.
Printed as a table and written to ``<output>/<stage.out_subdir>/eval.json``.

Ground truth: ``input=`` a COCO folder (``images/`` and ``annotations.json``) or an SA-1B
dataset (its shards), or, without ``input=``, ``stage.source`` (synthetic test scenes by
default, or ``stage.shards`` / ``stage.coco``).
"""
from __future__ import annotations

import os

from omegaconf import DictConfig, open_dict

from pipeline import storage
from pipeline.dataset.listing import committed_shards
from pipeline.models import registry
from pipeline.models.evaluation import evaluate_model
from pipeline.paths import PROJECT_ROOT

DEFAULT_INPUT = str(PROJECT_ROOT / "sample" / "images")  # the root config's: no input= given


def input_ground_truth(cfg: DictConfig) -> None:
    """Points ``stage.source`` at ``input=`` when one was given (in place): a COCO folder
    or an SA-1B dataset; anything else is refused, naming what was expected."""
    given = str(cfg.input)
    if os.path.normpath(given) == os.path.normpath(DEFAULT_INPUT):
        return
    stage = cfg.stage
    fs, root = storage.filesystem(given)
    found = [name for name in ("annotations.json", "instances.json") if fs.isfile(storage.join(root, name))]
    if not found and fs.isdir(root):
        found = [path.rsplit("/", 1)[-1] for path in fs.ls(root, detail=False) if path.endswith(".json")]
    with open_dict(stage):
        if len(found) == 1 or (found and found[0] in ("annotations.json", "instances.json")):
            stage.source = "coco"
            stage.coco.annotations = storage.join(given, found[0])
            images = storage.join(given, "images")
            stage.coco.image_dir = images if fs.isdir(storage.join(root, "images")) else given
            return
        try:
            shards = committed_shards(given)
        except (FileNotFoundError, ValueError):
            shards = []
        if shards:
            stage.source, stage.shards = "shards", given
            return
    raise ValueError(f"eval input={given}: expected a COCO folder (images/ and annotations.json, or one .json "
                     "instances file) or an SA-1B dataset (shards); for the synthetic test scenes leave input= out")


def run(cfg: DictConfig) -> dict:
    """Evaluates ``stage.checkpoint`` (a registered version, path or URL; null:
    ``model.checkpoint``) as ``stage.arch``, else the architecture the version was
    registered with, else ``model.arch``; returns ``evaluate_model``'s result."""
    input_ground_truth(cfg)
    stage = cfg.stage
    output = str(cfg.output)
    out_dir = storage.join(output, stage.out_subdir)
    storage.writable(out_dir)
    spec = stage.checkpoint if stage.checkpoint is not None else cfg.model.checkpoint
    checkpoint = registry.resolve_model(spec, output)
    arch = stage.arch or registry.registered_arch(checkpoint) or cfg.model.arch
    return evaluate_model(arch, checkpoint, stage, cfg.amg, out_dir, device=cfg.model.device)
