"""Stage ``verifier``: trains the mask verifier and registers it.

    python -m pipeline.run +stage=verifier output=DIR [stage.decisions=TABLE] [stage.synthetic.count=N]

Masks to learn from: the generator's masks (``cfg.model``, ``cfg.amg``) on synthetic
scenes labelled by the simulated annotator's rule, and/or tables of annotators'
decisions. Fitted on the driver; registered as ``<output>/models/verifier_<version>/``.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.dataset.provenance import code_version
from pipeline.models import registry, verifier
from pipeline.models.loader import build_generator, generator_kwargs, model_identity
from pipeline.truth.synthetic import iter_scenes, scene_seeds

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Returns the validation figures (``verifier.fit``'s info) plus version and path."""
    stage = cfg.stage
    output = str(cfg.output)
    version = stage.version or registry.next_version(output, "verifier")
    target = registry.version_dir(output, version, "verifier")
    decisions = stage.decisions
    tables = [str(p) for p in ([decisions] if isinstance(decisions, str) else list(decisions or []))]

    parts, trained_with = [], {"good_iou": float(stage.good_iou), "decisions": tables}
    if stage.synthetic.enabled:
        if cfg.amg.get("verifier"):
            log.info("amg.verifier is ignored here: a verifier learns from the generator's unfiltered masks")
        generator = build_generator(cfg.model, cfg.amg)
        syn = stage.synthetic
        scenes = iter_scenes(scene_seeds("train", int(syn.seed_start), int(syn.count)), tuple(syn.size))
        parts.append(verifier.synthetic_examples(generator.generate, scenes, float(stage.good_iou), progress=True))
        trained_with.update(model_arch=cfg.model.arch, model_sha256=model_identity(cfg.model.checkpoint),
                            amg=generator_kwargs(cfg.amg), synthetic=OmegaConf.to_container(syn, resolve=True))
    parts += [verifier.read_decisions(t) for t in tables]
    examples = verifier.Examples.concat(parts)
    if not len(examples):
        raise ValueError("the verifier has no masks to learn from: enable stage.synthetic or give stage.decisions")

    fitted = verifier.fit(examples, **OmegaConf.to_container(stage.fit, resolve=True),
                          validation_fraction=float(stage.validation_fraction),
                          target_precision=float(stage.target_precision), seed=int(stage.seed))
    verifier.save(fitted, target, extra={"trained_with": trained_with})
    config = {**OmegaConf.to_container(cfg, resolve=True), "code_version": code_version()}
    registry.write(target, registry.CONFIG_FILE, OmegaConf.to_yaml(config))
    registry.write(target, registry.EVAL_FILE, json.dumps(fitted.info, indent=2))
    summary = {"version": version, "path": target, **fitted.info}
    registry.mark_registered(target, summary)
    print(format_table(summary), flush=True)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    rows = [(k, v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k, _ in rows)
    head = f"verifier {summary['version']} at {summary['path']} (target met: {summary['target_met']})"
    return "\n".join([head] + [f"  {k:<{width}}  {v:10.4f}" for k, v in rows])
