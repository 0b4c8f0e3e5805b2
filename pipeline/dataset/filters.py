"""Which masks and images of a dataset count: the mask filter, by predicted IoU and
stability, and the held-out share of a dataset's images, by key.

One rule, with the generator's names (``amg.pred_iou_thresh``,
``amg.stability_score_thresh``), wherever masks are kept or dropped after the fact:
retrain's shards (``pipeline.truth.ground_truth.ShardMasks``), semi_auto's pre-fill
(``pipeline.masks.sources.DetectorSource``), the loop's count of trainable masks. A
mask without these fields (drawn by a person) passes. The filter counts what it kept
and dropped, so the stage that uses it can say so.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping


class MaskFilter:
    def __init__(self, pred_iou_thresh: float | None = 0.0, stability_score_thresh: float | None = 0.0) -> None:
        """A threshold of None (``amg.pred_iou_thresh: null``, the generator's family
        default) filters nothing: the generator already applied it to what it kept."""
        self.pred_iou_thresh = float(pred_iou_thresh or 0.0)
        self.stability_score_thresh = float(stability_score_thresh or 0.0)
        self.kept = self.dropped = 0  # masks counted by ``keeps``

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> "MaskFilter":
        """The filter of a config node with ``pred_iou_thresh`` and ``stability_score_thresh``."""
        return cls(settings["pred_iou_thresh"], settings["stability_score_thresh"])

    def keeps(self, predicted_iou: float | None, stability_score: float | None) -> bool:
        """Whether a mask with these scores passes (None: the mask has no such score); counted."""
        ok = ((predicted_iou is None or predicted_iou >= self.pred_iou_thresh)
              and (stability_score is None or stability_score >= self.stability_score_thresh))
        if ok:
            self.kept += 1
        else:
            self.dropped += 1
        return ok

    def __call__(self, annotations: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The annotations (SA-1B records' masks) that pass."""
        return [a for a in annotations if self.keeps(a.get("predicted_iou"), a.get("stability_score"))]

    def describe(self) -> str:
        """``kept K of N masks (predicted IoU >= a, stability >= b)``."""
        total = self.kept + self.dropped
        return (f"kept {self.kept} of {total} masks (predicted IoU >= {self.pred_iou_thresh:g}, "
                f"stability >= {self.stability_score_thresh:g})")


def is_held_out(key: str, fraction: float) -> bool:
    """Whether the image ``key`` belongs to the held-out share ``fraction`` of a dataset
    (kept out of training, to evaluate on): a pure function of the key, so every worker,
    every run and every model kind (SAM, the detector) agree."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
