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
"""
from __future__ import annotations

from omegaconf import DictConfig

from pipeline import storage
from pipeline.models import registry
from pipeline.models.evaluation import evaluate_model


def run(cfg: DictConfig) -> dict:
    """Evaluates ``stage.checkpoint`` (a registered version, path or URL; null:
    ``model.checkpoint``) as ``stage.arch``, else the architecture the version was
    registered with, else ``model.arch``; returns ``evaluate_model``'s result."""
    stage = cfg.stage
    output = str(cfg.output)
    out_dir = storage.join(output, stage.out_subdir)
    storage.writable(out_dir)
    spec = stage.checkpoint if stage.checkpoint is not None else cfg.model.checkpoint
    checkpoint = registry.resolve_model(spec, output)
    arch = stage.arch or registry.registered_arch(checkpoint) or cfg.model.arch
    return evaluate_model(arch, checkpoint, stage, cfg.amg, out_dir, device=cfg.model.device)
