"""The simulated click of interactive segmentation (RITM, SimpleClick, SAM protocol).

Each next click goes to the point farthest from the boundary of the largest error
region: positive inside a missed region, negative inside a false one. Shared by the
eval metrics and the simulated annotator of the annotate stage; implemented once, in
``sam_core.metrics`` (the model library's interactive metrics use it too).
"""
from __future__ import annotations

from sam_core.metrics import mask_iou, next_click

__all__ = ["mask_iou", "next_click"]
