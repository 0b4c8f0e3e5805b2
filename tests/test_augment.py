"""Fill-in augmentation: the paste plan's balance (pure), and the augment stage end to end
on real Ray, real tars and pycocotools: pasted boxes are their masks' extents, no mask
overlaps another after the occlusion updates, the category histogram is the requested
balance, the same seed gives the same dataset, and a killed run resumed gives every
image once."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from pipeline.dataset import listing as dataset
from pipeline.dataset import manifest, plan, shards
from pipeline.inputs.entries import read_item
from pipeline.inputs.images import prepare_image
from pipeline.masks import paste, paste_plan
from pipeline.stages import run_stage
from pipeline.truth.synthetic import CATEGORIES, make_scene, scene_seeds
from tests.test_box_prompts import kill_mid_run


def scene_dataset(root: Path, count: int, size=(160, 200)) -> Path:
    """A committed dataset of synthetic scenes (whole objects only, so no two masks
    overlap), each mask with its category (shape kind), written by the project's writers."""
    with shards.ShardWriter(str(root / "shards" / shards.shard_name(0))) as writer:
        rows = []
        for image_id, seed in enumerate(scene_seeds("test", 50, count), 1):
            scene = make_scene(seed, size)
            keep = np.array([k not in ("composite", "part") for k in scene.kinds])  # wholes of one leaf
            masks, categories = scene.masks[keep], scene.category_ids[keep]
            records = []
            for mask, category in zip(masks, categories):
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                x, y, w, h = mask_utils.toBbox(rle).tolist()
                records.append({"segmentation": rle, "area": int(mask.sum()), "bbox": [x, y, w - 1, h - 1],
                                "predicted_iou": 0.9, "stability_score": 0.95, "crop_box": [0, 0, size[1], size[0]],
                                "point_coords": [], "category_id": int(category), "box": [x, y, w, h]})
            key = f"sa_{image_id}"
            jpeg = _png_as_jpeg(scene.image)
            writer.write(key, jpeg, shards.sa1b_record(key, image_id, size[1], size[0], records, source=f"scene{seed}"))
            rows.append({"key": key, "image_id": image_id, "shard": shards.shard_name(0), "source": f"scene{seed}",
                         "source_sha256": "", "width": size[1], "height": size[0], "num_masks": len(records),
                         "model_sha256": "cd" * 32, "status": manifest.STATUS_OK})
    manifest.write_part(str(root), manifest.ERRORS_DIR, 0, [])
    manifest.write_part(str(root), manifest.MANIFEST_DIR, 0, rows)
    dataset.write_categories(str(root), CATEGORIES)
    return root


def _png_as_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def backgrounds(folder: Path, count: int, size=(192, 256)) -> Path:
    folder.mkdir(parents=True)
    for n in range(count):
        y, x = np.mgrid[0 : size[0], 0 : size[1]]
        rgb = np.stack([x * 255 // size[1], y * 255 // size[0], np.full_like(x, 40 * n)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"bg{n}.png")
    return folder


def augment_args(inp, out, *extra: str) -> list[str]:
    return ["+stage=augment", f"input={inp}", f"output={out}", "cluster.num_cpus=2", *extra]


def samples_of(out: Path) -> list[shards.Sample]:
    return list(dataset.iter_samples(str(out)))


def check_invariants(out: Path) -> list[dict]:
    """Every pasted or changed box is its mask's extent exactly; no two masks of an image
    overlap; area and SA-1B bbox agree with the RLE; each planned image is there once."""
    records = []
    table = manifest.read_table(str(out)).to_pylist()
    assert len({r["key"] for r in table}) == len(table) and all(r["status"] == "ok" for r in table)
    keys = [s.key for s in samples_of(out)]
    assert sorted(keys) == sorted(r["key"] for r in table), "shards and manifest agree, each image once"
    for sample in samples_of(out):
        record = sample.record
        h, w = record["image"]["height"], record["image"]["width"]
        assert Image.open(io.BytesIO(sample.jpg)).size == (w, h)
        masks = np.zeros((h, w), np.int32)
        for a in record["annotations"]:
            m = mask_utils.decode(a["segmentation"])
            assert a["area"] == m.sum() >= 16
            x, y, bw, bh = mask_utils.toBbox(a["segmentation"]).tolist()
            assert a["bbox"] == pytest.approx([x, y, bw - 1, bh - 1])
            if a.get("box_source") in ("pasted", "mask"):
                assert a["box"] == pytest.approx([x, y, bw, bh]), "a pasted box is its mask's extent"
            masks += m
        assert masks.max() <= 1, f"{sample.key}: masks overlap after the occlusion updates"
        records.append(record)
    return records


def test_quotas_fill_the_rarest_categories_first():
    assert paste_plan.quotas({1: 0, 2: 0, 3: 0}, {1: 1, 2: 1, 3: 1}, 10) in ({1: 4, 2: 3, 3: 3}, {1: 3, 2: 4, 3: 3},
                                                                          {1: 3, 2: 3, 3: 4})
    q = paste_plan.quotas({1: 50, 2: 5, 3: 0}, {1: 1, 2: 1, 3: 1}, 30)
    assert sum(q.values()) == 30 and q[1] == 0 and q[3] > q[2] > 0 and abs((5 + q[2]) - q[3]) <= 1
    q = paste_plan.quotas({1: 10, 2: 10}, {1: 3, 2: 1}, 20)  # 3:1 of 40 -> 30 and 10
    assert q == {1: 20, 2: 0}


def test_pasted_objects_on_new_backgrounds_follow_the_balance(compose_config, tmp_path, ray_local):
    inp = scene_dataset(tmp_path / "data", 6)
    bg = backgrounds(tmp_path / "bg", 3)
    out = tmp_path / "out"
    args = augment_args(inp, out, f"stage.backgrounds={bg}", "stage.copies=2", "stage.objects_per_image=7",
                        "stage.balance=uniform", "stage.paste.placement_tries=50")
    summary = run_stage(compose_config(*args))
    report = summary["augment"]
    assert summary["images_ok"] == 6 and report["pasted"] == report["planned"] == 42
    records = check_invariants(out)
    pasted = Counter(a["category_id"] for r in records for a in r["annotations"])
    assert sum(pasted.values()) == 42 and max(pasted.values()) - min(pasted.values()) <= 1, pasted
    assert set(pasted) == set(report["target"]), "every category with masks gets its share"
    assert all(a["box_source"] == "pasted" and a["pasted_from"]["key"].startswith("sa_")
               for r in records for a in r["annotations"])
    assert (out / "augment_preview.jpg").stat().st_size > 0
    assert json.loads((out / "categories.json").read_text()) == CATEGORIES

    # Deterministic by seed: the plan made again, and each image pasted again, are the
    # same; another seed gives other images.
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(compose_config(*args).stage, resolve=True)
    settings["backgrounds"] = str(bg)
    remade = paste_plan.make(str(inp), str(bg), CATEGORIES, settings)
    assert remade.pastes == paste_plan.read(str(out)).pastes
    by_key = {s.key: s for s in samples_of(out)}
    items = {i.key: i for u in plan.load_or_extend(str(out), [], 1).units for i in u.items}
    for seed, same in ((0, True), (1, False)):
        paster = paste.Paster({"output": str(out), "paste": settings["paste"], "seed": seed})
        for key, sample in list(by_key.items())[:2]:
            background = prepare_image(read_item(items[key]), short_side=None)
            again = paster(items[key], background)
            assert (again.image.jpeg == sample.jpg) == same
            assert ([a["segmentation"]["counts"].decode() for a in again.masks]
                    == [a["segmentation"]["counts"] for a in sample.record["annotations"]]) == same


def test_pasting_onto_the_dataset_s_own_images_updates_what_lies_under(compose_config, tmp_path, ray_local):
    inp = scene_dataset(tmp_path / "data", 4)
    before = {s.key: s.record for s in dataset.iter_samples(str(inp), images=False)}
    out = tmp_path / "out"
    summary = run_stage(compose_config(*augment_args(
        inp, out, "stage.objects_per_image=6", "stage.paste.blend=poisson", "stage.paste.scale=[1.0,2.0]",
        "stage.balance={1: 1, 3: 2}", "stage.favour_small=1.0")))
    report = summary["augment"]
    records = check_invariants(out)
    existing = sum(len(r["annotations"]) for r in before.values())
    assert report["background_masks"] + report["hidden"] == existing and report["hidden"] >= 0
    changed = [a for r in records for a in r["annotations"] if a.get("box_source") == "mask"]
    assert changed, "some background masks lost pixels under pasted objects"
    assert all(a["category_id"] in (1, 3) for r in records for a in r["annotations"] if a.get("box_source") == "pasted")
    # The requested balance, 1:2 of the whole output, as near as 24 pastes allow.
    hist = Counter(a["category_id"] for r in records for a in r["annotations"])
    plan_pastes = paste_plan.quotas(paste_plan.read(str(out)).existing, {1: 1 / 3, 3: 2 / 3}, 24)
    pasted = Counter(a["category_id"] for r in records for a in r["annotations"] if a.get("box_source") == "pasted")
    assert pasted == Counter({c: n for c, n in plan_pastes.items() if n})
    assert hist[3] >= hist[1] or plan_pastes[1] == 0


def test_killed_run_resumed_gives_every_image_once(compose_config, tmp_path, ray_local):
    inp = scene_dataset(tmp_path / "data", 3)
    bg = backgrounds(tmp_path / "bg", 2, size=(480, 640))
    out = tmp_path / "out"
    args = augment_args(inp, out, f"stage.backgrounds={bg}", "stage.copies=20", "stage.objects_per_image=12",
                        "stage.paste.blend=poisson", "stage.images_per_unit=1", "stage.num_actors=1")
    kill_mid_run(args, out, tmp_path, lambda: len(manifest.committed_units(str(out))) >= 2)
    done = len(manifest.committed_units(str(out)))
    assert 2 <= done < 40, "the run was stopped mid-way"
    summary = run_stage(compose_config(*args))
    assert summary["units_skipped"] == done and summary["units_committed"] == 40 - done
    assert summary["augment"]["pasted"] == summary["augment"]["planned"]
    assert len(check_invariants(out)) == 40
