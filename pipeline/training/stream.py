"""The training stream: endless batches mixing the configured ground-truth sources.

``data`` is ``stage.data`` of conf/stage/retrain.yaml as a plain dict (every key set
there; nothing is defaulted here).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import torch

from pipeline.truth.ground_truth import CocoInstances, GroundTruth, ShardMasks, SyntheticScenes


def _sources(data: Mapping[str, Any], img_size: int) -> dict[str, Any]:
    """The enabled sources by name (synthetic, shards, coco) with their sampling weights."""
    syn, coco = data["synthetic"], data["coco"]
    sources: dict[str, Any] = {}
    holdout = float(data["holdout_fraction"])  # kept out of training: the promotion gate's images
    if synthetic_enabled(data) and float(syn["weight"]) > 0:
        size = syn["size"] or (img_size, img_size)
        sources["synthetic"] = (SyntheticScenes("train", syn["seed_start"], syn["seed_count"], size, syn["domain"]),
                                float(syn["weight"]))
    if data["shards"] and float(data["shards_weight"]) > 0:
        sources["shards"] = (ShardMasks(data["shards"], data["pred_iou_thresh"], data["stability_score_thresh"],
                                        holdout), float(data["shards_weight"]))
    if coco["annotations"] and float(coco["weight"]) > 0:
        sources["coco"] = (CocoInstances(coco["annotations"], coco["image_dir"], holdout), float(coco["weight"]))
    if not sources:
        raise ValueError("retrain has no data: enable synthetic scenes or set data.shards / data.coco")
    return sources


def synthetic_enabled(data: Mapping[str, Any]) -> bool:
    """Whether synthetic scenes are trained on: ``data.synthetic.enabled``, where ``auto``
    means only when neither shards nor a COCO set are given (adapting to one's own
    annotated images is then the plain case)."""
    enabled = data["synthetic"]["enabled"]
    if enabled == "auto":
        return not data["shards"] and not data["coco"]["annotations"]
    return bool(enabled)


def training_stream(data: Mapping[str, Any], rank: int, world: int, start_step: int, batch_size: int,
                    img_size: int) -> Iterator[list[GroundTruth]]:
    """Endless batches for one worker, mixing the configured sources by weight.

    Every random choice is a pure function of (seed, rank, step, slot), and the real
    sources are replayed up to ``start_step`` without decoding, so a resumed run sees
    exactly the data an uninterrupted one would. Each worker reads its own share: every
    ``world``-th shard of a per-epoch permutation, every ``world``-th COCO image.
    """
    sources = _sources(data, img_size)
    names = list(sources)
    p = np.array([w for _, w in sources.values()]) / sum(w for _, w in sources.values())
    seed = int(data["seed"])

    def choose(step: int, slot: int) -> str:
        if len(names) == 1:
            return names[0]
        return names[int(np.random.default_rng([seed, rank, step, slot]).choice(len(names), p=p))]

    def real(kind: str, skip: int) -> Iterator[GroundTruth]:
        source = sources[kind][0]
        epoch = 0
        while True:
            if kind == "shards":
                files = source.files
                order = np.random.default_rng([seed, epoch]).permutation(len(files))
                mine = [files[i] for i in order[rank::world]] or [files[order[rank % len(files)]]]
                records: Iterator[Any] = source.records(mine)
            else:
                records = (r for i, r in enumerate(source.records()) if i % world == rank)
            yielded = False
            for record in records:
                yielded = True
                if skip > 0:  # consumed before the resume: skip without decoding
                    skip -= 1
                    continue
                yield source.decode(record)
            if not yielded:
                raise ValueError(f"data source {kind} gave this worker no images")
            epoch += 1

    consumed = {k: 0 for k in names}
    if names != ["synthetic"]:  # synthetic scenes are indexed by step: nothing to replay
        for step in range(start_step):
            for slot in range(batch_size):
                consumed[choose(step, slot)] += 1
    streams = {k: real(k, consumed[k]) for k in names if k != "synthetic"}
    step = start_step
    while True:
        batch = []
        for slot in range(batch_size):
            kind = choose(step, slot)
            if kind == "synthetic":
                batch.append(sources["synthetic"][0].scene((step * world + rank) * batch_size + slot))
            else:
                batch.append(next(streams[kind]))
        yield batch
        step += 1


def to_batch(items: list[GroundTruth], img_size: int, data: Mapping[str, Any], rng: np.random.Generator,
             square: bool = False):
    """A ``sam_core.training.Batch`` of the items' trainable masks (empty images skipped),
    or None when no item has one; ``square``: SAM 2's frame (``prepare_sample``)."""
    from sam_core.training import collate, prepare_sample, select_masks

    samples, supervise_iou = [], []
    for gt in items:
        if len(gt.masks) == 0:  # e.g. an image none of whose automatic masks passed the filters
            continue
        image, size, masks = prepare_sample(gt.image, gt.masks, img_size, square)
        idx = select_masks(masks.numpy(), int(data["max_masks_per_image"]),
                           float(data["max_area_fraction"]), int(data["min_mask_area"]), rng)
        if len(idx):
            samples.append((image, size, masks[torch.from_numpy(idx)]))
            supervise_iou.append(not gt.generated or bool(data["shards_supervise_iou"]))
    return collate(samples, supervise_iou) if samples else None
