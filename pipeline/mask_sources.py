"""Where a worker's masks come from: a mask source, chosen by name from an allow-list.

A mask source is built once per worker (it loads the model) and called once per image:
``source(item, image) -> list of mask records``. A record has the keys of the automatic
mask generator's ``coco_rle`` output (segmentation, area, bbox, predicted_iou,
stability_score, crop_box, point_coords); any further keys (a category, a detector
score, a provenance) are stored with the mask in the SA-1B record as they are.

The worker around it (pipeline.worker) owns everything else: reading and decoding,
the shard, the manifest, retries and exactly-once commits, so a new way of prompting
the model is one small class here and an entry in SOURCES.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

from pipeline import model
from pipeline.images import PreparedImage
from pipeline.sources import Item


class MaskSource(Protocol):
    def __call__(self, item: Item, image: PreparedImage) -> list[dict[str, Any]]: ...


class GridSource:
    """SAM's fully automatic generation: a grid of point prompts, filters and NMS, then,
    with ``amg.verifier``, only the masks the mask verifier accepts (each with its
    ``verifier_score``), at its registered threshold or the one for ``amg.verifier_precision``.

    spec keys: ``model`` (cfg.model), ``amg`` (cfg.amg), ``model_sha256``, and
    ``verifier_sha256`` (the verifier's identity the run recorded; its files are checked).
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        amg = model.plain(spec["amg"])
        self.generator = model.build_generator(spec["model"], amg, spec.get("model_sha256"))
        self.verifier = None
        if amg.get("verifier"):
            from pipeline.verifier import load_verifier

            self.verifier = load_verifier(amg["verifier"], spec.get("verifier_sha256"))
            self.threshold = self.verifier.threshold_for(amg.get("verifier_precision"))

    def __call__(self, item: Item, image: PreparedImage) -> list[dict[str, Any]]:
        records = self.generator.generate(image.rgb)
        if self.verifier is None:
            return records
        return self.verifier.keep(records, image.rgb, self.threshold)


SOURCES: dict[str, Callable[[Mapping[str, Any]], MaskSource]] = {
    "grid": GridSource,
}


def build(spec: Mapping[str, Any]) -> MaskSource:
    """The mask source named by ``spec["kind"]``, built from the rest of ``spec``."""
    kind = spec.get("kind")
    if kind not in SOURCES:
        raise ValueError(f"unknown mask source {kind!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[kind](spec)
