"""Which objects are pasted onto which background (fill-in augmentation), decided once,
on the driver, and recorded in the output.

The input dataset (masks with categories, e.g. box_prompts' output; a class-agnostic
one counts as one category) is indexed: where each committed sample lies (its shard and
the byte ranges of its ``.jpg`` and ``.json``), and the category and area of each mask.
Each output image is a copy of a background: an image of ``stage.backgrounds``, or, when
that is null, one of the dataset's own images with its masks. Each gets
``objects_per_image`` objects, cut from the dataset's masks.

Balance (``stage.balance``): null draws the objects as they come (each mask weighted by
area ** -favour_small, so favour_small > 0 prefers small objects); ``uniform`` or a
mapping ``{category id or name: weight}`` sets target shares for the category histogram
of the whole output (the backgrounds' own objects plus the pasted ones), and the paste
budget goes to the categories furthest below their share (water-filling: rare ones are
oversampled until the histogram is as close to the target as the budget allows).

Deterministic by ``stage.seed``; recorded at the first start in
``<out>/augment/outputs.parquet`` (one row per output image: its name and where its
background and the background's record are) and ``<out>/augment/pastes.parquet`` (one
row per pasted object: the output, the slot, the source sample and mask), so every
resume and every worker uses the same plan whatever happens to the input meanwhile.
"""
from __future__ import annotations

import json
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.dataset import listing as dataset
from pipeline.dataset import shards
from pipeline.dataset.rle import rle_problem
from pipeline.inputs.entries import Entry, InputError, enumerate_input

log = logging.getLogger(__name__)

PLAN_DIR = "augment"
OUTPUTS_FILE, PASTES_FILE = "outputs.parquet", "pastes.parquet"
DEFAULT_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
OUTPUTS_SCHEMA = pa.schema([
    ("name", pa.string()),  # the output image's identity in the plan (pipeline.dataset.plan)
    ("url", pa.string()), ("member", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),  # its background
    ("record_url", pa.string()), ("record_offset", pa.int64()), ("record_size", pa.int64()),  # the background's masks
    ("background_masks", pa.int32()),  # how many masks the background brings
])
PASTES_SCHEMA = pa.schema([
    ("name", pa.string()), ("slot", pa.int32()),
    ("shard", pa.string()), ("key", pa.string()),
    ("jpg_offset", pa.int64()), ("jpg_size", pa.int64()), ("json_offset", pa.int64()), ("json_size", pa.int64()),
    ("annotation", pa.int32()),  # index of the mask in the source record
    ("category_id", pa.int64()),
])


@dataclass
class PastePlan:
    """outputs: OUTPUTS_SCHEMA rows in plan order; pastes: PASTES_SCHEMA rows;
    existing: category id -> masks the backgrounds bring; target: category id -> share
    (empty without balance)."""

    outputs: list[dict[str, Any]]
    pastes: list[dict[str, Any]]
    existing: dict[int, int]
    target: dict[int, float]

    def entries(self) -> list[Entry]:
        """The output images as input entries of the driver (their backgrounds)."""
        return [Entry(o["name"], o["url"], o["member"], o["offset"], o["size"]) for o in self.outputs]


def make(input_url: str, backgrounds: str | None, categories: list[dict], settings: Mapping[str, Any]) -> PastePlan:
    """The plan for ``settings`` (conf/stage/augment.yaml: seed, copies,
    objects_per_image, balance, favour_small, min_instance_area, max_instance_fraction)."""
    rng = np.random.default_rng(int(settings["seed"]))
    samples = _index(input_url)
    pool = [(s, j, c, a) for s in samples for j, (c, a, fraction) in enumerate(s["masks"])
            if a >= settings["min_instance_area"] and fraction <= settings["max_instance_fraction"]]
    if not pool:
        raise InputError(
            f"input={input_url} has no mask to paste (of at least stage.min_instance_area="
            f"{settings['min_instance_area']} pixels and at most stage.max_instance_fraction of its image)")
    copies = int(settings["copies"])
    outputs, existing = [], Counter()
    if backgrounds:
        for entry in enumerate_input(backgrounds):
            for k in range(copies):
                outputs.append({"name": entry.name if copies == 1 else f"{entry.name}@{k}", "url": entry.url,
                                "member": entry.member, "offset": entry.offset, "size": entry.size,
                                "record_url": None, "record_offset": None, "record_size": None,
                                "background_masks": 0, "sample": None})
    else:
        for s in samples:
            for c, _, _ in s["masks"]:
                existing[c] += copies
            for k in range(copies):
                name = f"{posixpath.basename(s['shard'])}/{s['key']}.jpg"
                outputs.append({"name": name if copies == 1 else f"{name}@{k}", "url": s["shard"],
                                "member": f"{s['key']}.jpg", "offset": s["jpg"][0], "size": s["jpg"][1],
                                "record_url": s["shard"], "record_offset": s["json"][0], "record_size": s["json"][1],
                                "background_masks": len(s["masks"]), "sample": s})
    per_image = int(settings["objects_per_image"])
    target = _target(settings.get("balance"), pool, categories)
    weights = np.array([float(a) ** -float(settings["favour_small"]) for _, _, _, a in pool])
    by_category: dict[int, list[int]] = {}
    for i, (_, _, c, _) in enumerate(pool):
        by_category.setdefault(c, []).append(i)
    budget = per_image * len(outputs)
    if target:
        counts = quotas(dict(existing), target, budget)
        slots = rng.permutation(np.repeat(sorted(counts), [counts[c] for c in sorted(counts)]))
    else:
        slots = np.full(budget, -1)
    pastes, everything = [], list(range(len(pool)))
    for n, output in enumerate(outputs):
        for slot in range(per_image):
            category = int(slots[n * per_image + slot])
            candidates = by_category[category] if category >= 0 else everything
            own = output["sample"]
            others = candidates if own is None else (  # not onto its own image, where there is another
                [i for i in candidates if pool[i][0] is not own] or candidates)
            w = weights[others]
            sample, annotation, category_id, _ = pool[others[int(rng.choice(len(others), p=w / w.sum()))]]
            pastes.append({"name": output["name"], "slot": slot, "shard": sample["shard"], "key": sample["key"],
                           "jpg_offset": sample["jpg"][0], "jpg_size": sample["jpg"][1],
                           "json_offset": sample["json"][0], "json_size": sample["json"][1],
                           "annotation": annotation, "category_id": category_id})
    for output in outputs:
        del output["sample"]
    return PastePlan(outputs, pastes, dict(existing), target)


def quotas(existing: Mapping[int, int], target: Mapping[int, float], budget: int) -> dict[int, int]:
    """Pastes per category that bring ``existing`` + pastes closest to the ``target``
    shares: the budget fills the categories below their share first (water-filling),
    rounded to whole objects by largest remainder. Sums to ``budget``."""
    cats = sorted(target)
    share = np.array([target[c] for c in cats], np.float64)
    share = share / share.sum()
    have = np.array([existing.get(c, 0) for c in cats], np.float64)
    lo, hi = 0.0, (have.sum() + budget) / share.min() + 1.0
    for _ in range(200):  # total L where sum(max(0, share * L - have)) == budget
        level = (lo + hi) / 2
        if np.clip(share * level - have, 0, None).sum() < budget:
            lo = level
        else:
            hi = level
    fill = np.clip(share * hi - have, 0, None)
    fill = fill * (budget / fill.sum()) if fill.sum() > 0 else np.full(len(cats), budget / len(cats))
    whole = np.floor(fill).astype(int)
    for i in np.argsort(-(fill - whole), kind="stable")[: budget - whole.sum()]:
        whole[i] += 1
    return {c: int(n) for c, n in zip(cats, whole)}


def _target(balance: Any, pool: list, categories: list[dict]) -> dict[int, float]:
    present = sorted({c for _, _, c, _ in pool})
    if balance is None or balance == "none":
        return {}
    if balance == "uniform":
        return {c: 1.0 / len(present) for c in present}
    if not isinstance(balance, Mapping):
        raise ValueError(f"stage.balance must be null, uniform or a mapping of category to weight, not {balance!r}")
    ids = {str(c["name"]): int(c["id"]) for c in categories}
    target: dict[int, float] = {}
    for name, weight in balance.items():
        category = int(name) if str(name).lstrip("-").isdigit() else ids.get(str(name))
        if category is None or category not in present:
            raise InputError(f"stage.balance asks for category {name!r}, but the input has no mask of it to paste "
                             f"(categories with masks: {present})")
        target[category] = float(weight)
    total = sum(target.values())
    if total <= 0:
        raise ValueError("stage.balance: the weights must add up to more than 0")
    return {c: w / total for c, w in target.items()}


def _index(url: str) -> list[dict[str, Any]]:
    """Every committed sample of the dataset: shard, key, jpg and json byte ranges, and
    its masks as (category id, area, share of the image)."""
    samples = []
    for shard in dataset.committed_shards(url):
        ranges = shards.member_ranges(shard)
        for sample in shards.iter_shard(shard, images=False):
            jpg, json_range = ranges.get(f"{sample.key}.jpg"), ranges.get(f"{sample.key}.json")
            if jpg is None or json_range is None:
                log.warning("%s: sample %s has no .jpg or .json member of that name; not used", shard, sample.key)
                continue
            image = sample.record["image"]
            height, width = int(image["height"]), int(image["width"])
            pixels = max(1, width * height)
            masks = []
            for a in sample.record["annotations"]:  # a mask that does not fit its image is never pasted (area -1)
                problem = rle_problem(a.get("segmentation"), height, width)
                if problem is not None:
                    log.warning("%s %s: mask %s is not pasted: %s", shard, sample.key, a.get("id"), problem)
                masks.append((int(a.get("category_id", DEFAULT_CATEGORY["id"])),
                              -1 if problem else int(a["area"]), int(a["area"]) / pixels))
            samples.append({"shard": shard, "key": sample.key, "jpg": jpg, "json": json_range, "masks": masks})
    return samples


def write(output: str, the_plan: PastePlan) -> None:
    """Records the plan in the output (pastes first: the outputs table marks it complete)."""
    fs, root = storage.filesystem(output)
    for name, rows, schema in ((PASTES_FILE, the_plan.pastes, PASTES_SCHEMA),
                               (OUTPUTS_FILE, the_plan.outputs, OUTPUTS_SCHEMA)):
        with storage.atomic_open(fs, storage.join(root, PLAN_DIR, name)) as f:
            table = pa.Table.from_pylist(rows, schema=schema)
            if name == OUTPUTS_FILE:
                table = table.replace_schema_metadata({
                    b"existing": json.dumps(sorted(the_plan.existing.items())).encode(),
                    b"target": json.dumps(sorted(the_plan.target.items())).encode()})
            pq.write_table(table, f)


def read(output: str) -> PastePlan | None:
    """The plan recorded in the output, or None before its first start."""
    fs, root = storage.filesystem(output)
    outputs_path = storage.join(root, PLAN_DIR, OUTPUTS_FILE)
    if not fs.exists(outputs_path):
        return None
    with fs.open(outputs_path, "rb") as f:
        table = pq.read_table(f)
    with fs.open(storage.join(root, PLAN_DIR, PASTES_FILE), "rb") as f:
        pastes = pq.read_table(f, schema=PASTES_SCHEMA).to_pylist()
    meta = table.schema.metadata or {}
    return PastePlan(table.select(OUTPUTS_SCHEMA.names).to_pylist(), pastes,
                     {int(c): n for c, n in json.loads(meta.get(b"existing", b"[]"))},
                     {int(c): w for c, w in json.loads(meta.get(b"target", b"[]"))})


def pastes_by_output(output: str) -> dict[str, list[dict[str, Any]]]:
    """``pastes.parquet`` grouped by output name, in slot order (what a worker reads)."""
    fs, root = storage.filesystem(output)
    with fs.open(storage.join(root, PLAN_DIR, PASTES_FILE), "rb") as f:
        rows = pq.read_table(f, schema=PASTES_SCHEMA).to_pylist()
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: (r["name"], r["slot"])):
        grouped.setdefault(row["name"], []).append(row)
    return grouped


def records_by_output(output: str) -> dict[str, tuple[str, int, int]]:
    """Output name -> (url, offset, size) of its background's record (dataset backgrounds)."""
    fs, root = storage.filesystem(output)
    with fs.open(storage.join(root, PLAN_DIR, OUTPUTS_FILE), "rb") as f:
        rows = pq.read_table(f).select(OUTPUTS_SCHEMA.names).to_pylist()
    return {r["name"]: (r["record_url"], r["record_offset"], r["record_size"]) for r in rows if r["record_url"]}
