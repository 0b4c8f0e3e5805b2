"""+stage=stats against values computed independently from the decoded masks."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from scipy.spatial import ConvexHull

from .dataset_factory import MODEL_SHA256, compose, make_dataset
from pipeline.stages import run_stage
from pipeline.dataset import committed_shards
from pipeline.stats import SIZE_BIN_EDGES, concavity, shard_stats


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory, ray_local):
    """A 2-shard dataset and the stats stage run on real Ray (forced: auto would stay local)."""
    root = tmp_path_factory.mktemp("stats") / "dataset"
    dataset = make_dataset(root, num_shards=2, images_per_shard=3)
    cfg = compose("stats", root, overrides=["stage.parallel=ray", "stage.concavity_per_bin=2"])
    summary = run_stage(cfg)
    return dataset, summary


def coco_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def hull_concavity(mask: np.ndarray) -> float:
    """Concavity from the hull of every pixel's four corners (scipy, not OpenCV)."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1)
                              for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)])
    return 1.0 - len(xs) / ConvexHull(corners).volume


def true_masks(dataset) -> dict[int, tuple]:
    """mask id -> (sample, mask, annotation)."""
    return {a["id"]: (s, m, a) for s in dataset.samples
            for m, a in zip(s.masks, s.record["annotations"])}


def test_mask_table_matches_decoded_masks(stats_run):
    dataset, summary = stats_run
    table = pd.read_parquet(dataset.root / "stats" / "masks.parquet")
    truth = true_masks(dataset)
    assert sorted(table["mask_id"]) == sorted(truth)
    for row in table.itertuples():
        sample, mask, ann = truth[row.mask_id]
        h, w = mask.shape
        assert (row.key, row.shard, row.image_id) == (sample.key, sample.shard,
                                                      sample.record["image"]["image_id"])
        assert row.area == mask.sum()
        assert row.rel_size == pytest.approx(np.sqrt(mask.sum() / (h * w)))
        x, y, bw, bh = coco_bbox(mask)
        assert [row.bbox_x, row.bbox_y, row.bbox_w, row.bbox_h] == [x, y, bw, bh]
        assert row.center_x == pytest.approx((x + bw / 2) / w)
        assert row.center_y == pytest.approx((y + bh / 2) / h)
        assert row.predicted_iou == pytest.approx(ann["predicted_iou"], rel=1e-6)
        assert row.stability_score == pytest.approx(ann["stability_score"], rel=1e-6)
        assert [row.crop_x, row.crop_y, row.crop_w, row.crop_h] == [0, 0, w, h]
        assert [row.point_x, row.point_y] == ann["point_coords"][0]
    assert summary["masks"] == len(truth)


def test_image_table_matches_decoded_masks(stats_run):
    dataset, _ = stats_run
    table = pd.read_parquet(dataset.root / "stats" / "images.parquet").set_index("key")
    assert sorted(table.index) == sorted(s.key for s in dataset.samples)
    for s in dataset.samples:
        row = table.loc[s.key]
        h, w = s.image.shape[:2]
        union = np.any(s.masks, axis=0) if s.masks else np.zeros((h, w), bool)
        assert (row.width, row.height, row.num_masks) == (w, h, len(s.masks))
        assert row.covered_fraction == pytest.approx(union.mean())


def test_concavity_sample_is_stratified_and_exact(stats_run):
    dataset, _ = stats_run
    table = pd.read_parquet(dataset.root / "stats" / "masks.parquet")
    truth = true_masks(dataset)
    sampled = table[table.concavity.notna()]
    assert len(sampled) > 0
    for row in sampled.itertuples():
        assert row.concavity == pytest.approx(hull_concavity(truth[row.mask_id][1]), abs=1e-5)
    # Up to 2 per (shard, size bin), and exactly min(2, population): nothing is left out.
    table["size_bin"] = np.searchsorted(SIZE_BIN_EDGES, table.rel_size, side="right") - 1
    groups = table.groupby(["shard", "size_bin"])
    per_bin = groups.concavity.count()
    assert (per_bin == groups.size().clip(upper=2)).all()


def test_concavity_of_known_shapes():
    square = np.zeros((20, 20), np.uint8)
    square[5:15, 5:15] = 1
    assert concavity(square) == pytest.approx(0.0)
    ell = square.copy()
    ell[5:10, 10:15] = 0  # a 10x10 square missing a 5x5 quarter: hull area 100 - 12.5
    assert concavity(ell) == pytest.approx(1 - 75 / 87.5)


def test_summary_matches_independent_counts(stats_run):
    dataset, summary = stats_run
    counts = np.array([len(s.masks) for s in dataset.samples])
    expected_bins = [np.mean(counts <= 10), np.mean((counts > 10) & (counts <= 50)), 0, 0, 0]
    from pipeline.stats import summarize

    full = summarize(dataset.root / "stats")
    assert full["images"] == summary["images"] == len(dataset.samples)
    assert full["shards"] == 2
    assert full["bytes"] == sum(Path(p).stat().st_size for p in committed_shards(str(dataset.root)))
    assert full["masks_per_image_mean"] == pytest.approx(counts.mean())
    assert full["masks_per_image_median"] == pytest.approx(np.median(counts))
    np.testing.assert_allclose(full["masks_per_image_hist"], np.array(expected_bins) * 100)
    assert full["centre_hist"].sum() == counts.sum()
    assert full["rel_size_hist"].sum() == pytest.approx(100)
    assert full["masks_per_s_per_core"] > 0


def test_ray_and_local_give_the_same_tables(stats_run):
    dataset, _ = stats_run
    from_ray = pq.read_table(dataset.root / "stats" / "masks.parquet")
    local = pa.concat_tables([shard_stats(p, concavity_per_bin=2).masks
                              for p in committed_shards(str(dataset.root))])
    # NaN (unsampled concavity) != NaN for Table.equals; pandas compares NaN as equal.
    pd.testing.assert_frame_equal(from_ray.to_pandas(), local.to_pandas())


def test_report_is_self_contained(stats_run):
    dataset, summary = stats_run
    html = (dataset.root / "stats" / "report.html").read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(pngs) == 6
    for png in pngs:
        image = cv2.imdecode(np.frombuffer(base64.b64decode(png), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[0] > 100
    for text in ("Masks per image", "Relative mask size", "Concavity", "Mask centres",
                 "Image resolution", "Predicted IoU", "11M", "1.1B", "~100",
                 f"<td>Masks</td><td>{summary['masks']}</td>", "stratified sample"):
        assert text in html


def test_dataset_card(stats_run):
    dataset, summary = stats_run
    text = (dataset.root / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["annotations_creators"] == ["machine-generated"]
    assert front["size_categories"] == ["n<1K"]
    assert "image-segmentation" in front["task_categories"]
    assert "license" not in front and "# license: left for the dataset owner" in text
    for part in ("## Dataset Structure", "## Dataset Creation", "## Statistics", "### Limitations",
                 MODEL_SHA256, "0123456789abcdef", "points_per_side: 32", "name: vit_b",
                 f"| Masks | {summary['masks']} |", '"counts": str'):
        assert part in text


def test_sa1b_tars_without_manifest(tmp_path, capsys):
    root = tmp_path / "sa1b"
    dataset = make_dataset(root, num_shards=1, images_per_shard=4, layout="sa1b")
    (root / "README.md").write_text("hand-written card\n")
    summary = run_stage(compose("stats", root, tmp_path / "out"))
    assert summary["images"] == 4
    assert summary["masks"] == sum(len(s.masks) for s in dataset.samples)
    assert "masks/s per core" in capsys.readouterr().out
    card = (tmp_path / "out" / "README.md").read_text()
    assert "not recorded" in card
    assert "manifest/part" not in card and "sa_%06d.tar" in card
    # The stats went to output=, not into the (possibly read-only) download.
    assert (tmp_path / "out" / "stats" / "masks.parquet").exists()
    assert not (root / "stats").exists()
    # A card written by a person is never overwritten.
    run_stage(compose("stats", root))
    assert (root / "README.md").read_text() == "hand-written card\n"
