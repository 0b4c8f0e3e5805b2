"""+stage=stats against values computed independently from the decoded masks."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from scipy.spatial import ConvexHull

from pipeline.dataset.listing import committed_shards
from pipeline.stages import run_stage
from pipeline.stats.tables import SIZE_BIN_EDGES, concavity, shard_stats

from .dataset_factory import MODEL_SHA256, REPO, compose, make_dataset


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory, ray_local):
    """A 2-shard dataset and the stats stage run on real Ray (forced: auto would stay local)."""
    root = tmp_path_factory.mktemp("stats") / "dataset"
    dataset = make_dataset(root, num_shards=2, images_per_shard=3)
    cfg = compose("stats", root, overrides=["stage.parallel=ray", "stage.concavity_per_bin=2",
                                            "stage.license=cc-by-4.0"])
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
    from pipeline.stats.tables import summarize

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
    assert front["license"] == "cc-by-4.0"
    assert front["configs"][0]["data_files"] == [{"split": "train", "path": ["shards/*.tar"]}]
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


# --- records that are not SA-1B's, crash safety, object stores --------------------------

FOREIGN = {
    "caption_1.json": json.dumps({"caption": "a cat on a mat"}),
    "caption_1.jpg": "not even a JPEG",
    "listed.json": json.dumps([1, 2, 3]),
    "flat.json": json.dumps({"image": {"image_id": 90, "width": 4, "height": 4,
                                       "file_name": "flat.jpg"}, "annotations": "none"}),
    "cut.json": '{"image": {"image_id"',
}


def add_members(tar_path: Path, members: dict[str, str]) -> None:
    """Appends members to an uncompressed tar (a shard from someone else's tool)."""
    with tarfile.open(tar_path, "a") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_foreign_json_members_are_skipped_and_reported(tmp_path, caplog):
    dataset = make_dataset(tmp_path / "dataset", num_shards=2, images_per_shard=2)
    add_members(dataset.shard_path(0), FOREIGN)
    summary = run_stage(compose("stats", dataset.root, tmp_path / "out",
                                overrides=["stage.parallel=local"]))
    assert summary["images"] == len(dataset.samples)
    assert summary["masks"] == sum(len(s.masks) for s in dataset.samples)
    assert summary["skipped"] == 4
    reported = {m for m in caplog.messages if m.startswith("skipped shard sa_000000.tar key ")}
    for key, reason in (("caption_1", "no 'image' object"), ("listed", "a JSON list"),
                        ("flat", "'annotations' is str"), ("cut", "JSONDecodeError")):
        assert any(f"key {key}: " in m and reason in m for m in reported), (key, reported)


def _stage(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.run", *overrides]


def blocking_shard(dataset, index: int) -> bytes:
    """Replaces shard ``index`` by a FIFO: a reader blocks on it, mid-run, until it is
    written to. Returns the shard's bytes to put back."""
    path = dataset.shard_path(index)
    data = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    return data


def wait_until_read(fifo: Path, process: subprocess.Popen, timeout: float = 120) -> int:
    """Waits until ``process`` has opened the FIFO for reading; returns a write end that
    keeps it blocked (closing it would send end-of-file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody reads it yet
            time.sleep(0.05)
    raise AssertionError(f"{fifo} was never opened")


def test_killed_stats_leaves_nothing_truncated_and_a_rerun_finishes(tmp_path):
    """SIGKILL while the tables are half-written (the stage blocks on the 2nd of 3
    shards): no file under a final name, and the same command then completes."""
    dataset = make_dataset(tmp_path / "dataset", num_shards=3, images_per_shard=2)
    fifo = dataset.shard_path(1)
    shard = blocking_shard(dataset, 1)
    command = _stage("+stage=stats", f"input={dataset.root}", "stage.parallel=local",
                     f"hydra.run.dir={tmp_path / 'run'}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    writer = wait_until_read(fifo, process)
    process.kill()
    process.wait(timeout=60)
    os.close(writer)
    assert process.returncode == -9
    stats = dataset.root / "stats"
    left = sorted(p.name for p in stats.iterdir())
    assert left and all(".tmp-" in name for name in left), f"final names after a kill: {left}"
    assert not (dataset.root / "README.md").exists()

    fifo.unlink()
    fifo.write_bytes(shard)
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.name for p in stats.iterdir()) == ["figures", "images.parquet", "masks.parquet",
                                                        "report.html", "shards.parquet"]
    assert pq.read_table(stats / "masks.parquet").num_rows == sum(len(s.masks) for s in dataset.samples)
    assert pq.read_table(stats / "shards.parquet").num_rows == 3
    assert (dataset.root / "README.md").read_text().count("![") == 6


def test_stats_from_s3_into_s3(s3_env, tmp_path, monkeypatch):
    """Input and output on an object store: the tables, report, figures and card are
    objects; nothing is written locally (no folder named 's3:')."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("stats-bucket")
    dataset = make_dataset(tmp_path / "dataset", num_shards=2, images_per_shard=3)
    fs.put(str(dataset.root) + "/", "stats-bucket/dataset/", recursive=True)
    monkeypatch.chdir(tmp_path)
    summary = run_stage(compose("stats", "s3://stats-bucket/dataset",
                                overrides=["stage.parallel=local"]))
    assert summary["report"] == "s3://stats-bucket/dataset/stats/report.html"
    assert summary["card"] == "s3://stats-bucket/dataset/README.md"
    assert not (tmp_path / "s3:").exists()
    fs.invalidate_cache()
    masks = pq.read_table("stats-bucket/dataset/stats/masks.parquet", filesystem=fs).to_pandas()
    assert sorted(masks["mask_id"]) == sorted(true_masks(dataset))
    assert len(fs.glob("stats-bucket/dataset/stats/figures/*.png")) == 6
    card = fs.cat_file("stats-bucket/dataset/README.md").decode()
    assert yaml.safe_load(card.split("---")[1])["configs"][0]["data_files"][0]["path"] == ["shards/*.tar"]
    assert not [p for p in fs.find("stats-bucket") if ".tmp-" in p]
    # And from S3 into another S3 prefix.
    run_stage(compose("stats", "s3://stats-bucket/dataset", "s3://stats-bucket/elsewhere",
                      overrides=["stage.parallel=local"]))
    fs.invalidate_cache()
    assert fs.exists("stats-bucket/elsewhere/stats/images.parquet")
    assert "s3://stats-bucket/dataset/shards/*.tar" in fs.cat_file("stats-bucket/elsewhere/README.md").decode()


def test_the_report_says_when_a_dataset_was_made_unlike_sa1b():
    from pipeline.stats.report import SA1B_SETTINGS, settings_notes

    quickstart = {"amg": {**SA1B_SETTINGS, "pred_iou_thresh": 0.4, "stability_score_thresh": 0.85,
                          "crop_n_layers": 0}, "model_family": "sam"}
    (note,) = settings_notes(quickstart)
    assert "pred_iou_thresh 0.4 (SA-1B: 0.88)" in note and "crop_n_layers 0 (SA-1B: 2)" in note
    assert "min_mask_region_area" not in note
    assert settings_notes({"amg": {**SA1B_SETTINGS, "pred_iou_thresh": None}, "model_family": "sam"}) == []
    (sam2,) = settings_notes({"amg": {**SA1B_SETTINGS, "pred_iou_thresh": None}, "model_family": "sam2"})
    assert "pred_iou_thresh 0.8 (SA-1B: 0.88)" in sam2
    assert settings_notes(None) == [] and settings_notes({"stage": {}}) == []


def test_a_reference_dataset_is_drawn_on_the_distributions(tmp_path):
    """stage.reference=<another stats run> (e.g. SA-1B's own tars): its masks-per-image,
    relative-size and concavity distributions are drawn on this report's plots, as
    measured by the same code; a path without stats is refused before any work."""
    from pipeline.stats import report
    from pipeline.stats.tables import summarize

    make_dataset(tmp_path / "sa1b", num_shards=1, images_per_shard=4, layout="sa1b", seed=1)
    run_stage(compose("stats", tmp_path / "sa1b", tmp_path / "sa1b_stats"))
    make_dataset(tmp_path / "ours", num_shards=1, images_per_shard=3)
    with pytest.raises(FileNotFoundError, match="no stats/masks.parquet"):
        run_stage(compose("stats", tmp_path / "ours", tmp_path / "out", ["stage.reference=" + str(tmp_path / "ours")]))
    assert not (tmp_path / "out").exists()
    run_stage(compose("stats", tmp_path / "ours", tmp_path / "out", [f"stage.reference={tmp_path / 'sa1b_stats'}"]))
    assert (tmp_path / "out" / "stats" / "report.html").exists()

    ours, ref = summarize(str(tmp_path / "out" / "stats")), summarize(str(tmp_path / "sa1b_stats" / "stats"))
    for make, key in ((report.fig_masks_per_image, "masks_per_image_hist"), (report.fig_rel_size, "rel_size_hist"),
                      (report.fig_concavity, "concavity_hist")):
        ax = make(ours, reference=("sa1b_stats", ref)).axes[0]
        drawn = next(line for line in ax.get_lines() if line.get_label().startswith("sa1b_stats"))
        np.testing.assert_allclose(drawn.get_ydata(), ref[key])
        assert not any(line.get_label().startswith("sa1b") for line in make(ours).axes[0].get_lines())
