"""COCO compressed RLE, checked before anything decodes it.

pycocotools decodes a malformed string without complaint (writing past the mask: we
saw garbage sums), and allocates whatever ``size`` claims (a record claiming 200M pixels
on a 48x64 image takes gigabytes), so every reader of masks it did not make itself
checks them here first (``rle_problem``) and drops, with a reason, what does not fit:
the annotation tool's pre-filled masks, retrain's and eval's shards, augment, stats,
validate.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np


def rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string (pycocotools' ``rleFrString``, but
    checked: a byte outside the alphabet, a string that ends inside a run length, or a
    run length beyond any image raise ``ValueError``). Vectorised: a reader checks every
    mask it reads at a few microseconds each."""
    data = np.frombuffer(counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts),
                         np.uint8).astype(np.int64) - 48
    if data.size == 0:
        return []
    if ((data < 0) | (data >= 64)).any():
        bad = int(data[(data < 0) | (data >= 64)][0]) + 48
        raise ValueError(f"byte {bytes([bad % 256])!r} outside the RLE alphabet")
    more = (data & 0x20) != 0
    if more[-1]:
        raise ValueError("string ends inside a run length")
    last = np.flatnonzero(~more)                   # the last character of each run length
    first = np.concatenate([[0], last[:-1] + 1])
    lengths = last - first + 1
    if lengths.max() > 7:                          # 35 bits: more pixels than any image has
        raise ValueError("a run length is out of range")
    shift = 5 * (np.arange(data.size) - np.repeat(first, lengths))
    values = np.add.reduceat((data & 0x1F) << shift, first)
    negative = (data[last] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    # Runs from the fourth on are stored as differences to the run two before.
    for parity in (1, 2):
        values[parity::2] = np.cumsum(values[parity::2]) if len(values) > parity else values[parity::2]
    return values.tolist()


def rle_problem(segmentation: Any, height: int, width: int) -> str | None:
    """Why ``segmentation`` is not the compressed RLE of a mask of an image of
    ``height`` x ``width`` pixels (the reason, naming what is wrong), or None."""
    if not isinstance(segmentation, Mapping) or "size" not in segmentation or "counts" not in segmentation:
        return f"segmentation is not a COCO RLE ({type(segmentation).__name__} without size and counts)"
    size = segmentation["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(type(v) is int for v in size):
        return f"RLE size {size!r} is not [height, width]"
    if list(size) != [height, width]:
        return f"RLE size {list(size)} but the image is {[height, width]}"
    counts = segmentation["counts"]
    if not isinstance(counts, (str, bytes)):
        return f"RLE counts are {type(counts).__name__}, not a compressed RLE string"
    try:
        runs = rle_counts(counts)
    except ValueError as exc:
        return f"RLE does not parse: {exc}"
    if any(r < 0 for r in runs):
        return "RLE has a negative run length"
    if sum(runs) != height * width:
        return f"RLE covers {sum(runs)} pixels, the image has {height * width}"
    return None


def usable(annotations: Iterable[Mapping[str, Any]], height: int, width: int,
           ) -> tuple[list[Mapping[str, Any]], list[str]]:
    """(the annotations whose segmentation fits the image, a reason per one that does not)."""
    kept, problems = [], []
    for index, ann in enumerate(annotations):
        problem = rle_problem(ann.get("segmentation") if isinstance(ann, Mapping) else None, height, width)
        if problem is None:
            kept.append(ann)
        else:
            problems.append(f"mask {ann.get('id', index) if isinstance(ann, Mapping) else index}: {problem}")
    return kept, problems
