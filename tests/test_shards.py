"""pipeline.dataset.shards and pipeline.dataset.manifest: SA-1B records from the real generator, tars
read back with webdataset, tarfile, Ray Data and pycocotools, atomic commits."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from pipeline.dataset import manifest
from pipeline.dataset.shards import ShardWriter, annotation_id, iter_shard, sa1b_record
from pipeline.models.loader import build_generator
from tests.conftest import encode, scene

AMG = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def generated(tiny_checkpoint):
    """(jpeg bytes, rgb, generator records) of one small scene."""
    generator = build_generator({"arch": "vit_tiny", "checkpoint": str(tiny_checkpoint), "device": "cpu"}, AMG)
    rgb = scene(64, 48, 0)
    masks = generator.generate(rgb)
    assert masks, "the random model should keep some masks with all filters off"
    return encode(Image.fromarray(rgb), "JPEG"), rgb, masks


def test_record_has_the_exact_sa1b_schema(generated):
    _, _, masks = generated
    record = sa1b_record("k-1", 7, 64, 48, masks)
    assert record["image"] == {"image_id": 7, "width": 64, "height": 48, "file_name": "k-1.jpg"}
    assert len(record["annotations"]) == len(masks)
    keys = {"id", "segmentation", "bbox", "area", "predicted_iou", "stability_score", "crop_box", "point_coords"}
    for index, ann in enumerate(record["annotations"]):
        assert set(ann) == keys
        assert ann["id"] == annotation_id(7, index)
        assert ann["segmentation"]["size"] == [48, 64] and isinstance(ann["segmentation"]["counts"], str)
        assert isinstance(ann["area"], int) and len(ann["bbox"]) == 4 and len(ann["crop_box"]) == 4
        assert len(ann["point_coords"]) == 1 and len(ann["point_coords"][0]) == 2
    json.dumps(record)  # plain JSON types only


def test_annotation_ids_are_unique_across_images_and_stable():
    ids = {annotation_id(image_id, i) for image_id in range(1, 50) for i in range(300)}
    assert len(ids) == 49 * 300
    assert annotation_id(3, 5) == annotation_id(3, 5)
    with pytest.raises(ValueError):
        annotation_id(1, 10**7)


def test_shard_round_trip_with_webdataset_tarfile_and_pycocotools(generated, tmp_path):
    jpeg, rgb, masks = generated
    url = str(tmp_path / "shards" / "sa_000003.tar")
    with ShardWriter(url) as shard:
        for n in range(3):
            shard.write(f"img-{n}", jpeg, sa1b_record(f"img-{n}", n + 1, 64, 48, masks))
    with tarfile.open(url) as tar:
        assert tar.getnames() == [f"img-{n}.{ext}" for n in range(3) for ext in ("jpg", "json")]
    samples = list(iter_shard(url))
    assert [s.key for s in samples] == ["img-0", "img-1", "img-2"]
    for sample in samples:
        assert sample.jpg == jpeg
        assert Image.open(io.BytesIO(sample.jpg)).size == (64, 48)
        for ann, mask in zip(sample.record["annotations"], masks):
            decoded = mask_utils.decode(ann["segmentation"])
            assert decoded.shape == (48, 64)
            assert decoded.sum() == ann["area"] == mask["area"]
    assert list((tmp_path / "shards").iterdir()) == [tmp_path / "shards" / "sa_000003.tar"]


def test_shards_are_byte_identical_on_rerun(generated, tmp_path):
    jpeg, _, masks = generated
    contents = []
    for attempt in range(2):
        url = str(tmp_path / f"sa_00000{attempt}.tar")
        with ShardWriter(url) as shard:
            shard.write("a", jpeg, sa1b_record("a", 1, 64, 48, masks))
        contents.append((tmp_path / f"sa_00000{attempt}.tar").read_bytes())
    assert contents[0] == contents[1]


def test_a_failed_shard_leaves_nothing_behind(generated, tmp_path):
    jpeg, _, masks = generated
    url = str(tmp_path / "shards" / "sa_000000.tar")
    with pytest.raises(RuntimeError):
        with ShardWriter(url) as shard:
            shard.write("a", jpeg, sa1b_record("a", 1, 64, 48, masks))
            raise RuntimeError("killed mid-shard")
    assert list((tmp_path / "shards").iterdir()) == []


def test_ray_data_reads_the_shards(generated, tmp_path, ray_local):
    jpeg, _, masks = generated
    with ShardWriter(str(tmp_path / "sa_000000.tar")) as shard:
        shard.write("a", jpeg, sa1b_record("a", 1, 64, 48, masks))
        shard.write("b", jpeg, sa1b_record("b", 2, 64, 48, masks))
    rows = ray_local.data.read_webdataset(str(tmp_path)).take_all()
    assert sorted(r["__key__"] for r in rows) == ["a", "b"]
    row = rows[0]
    image = row["jpg"] if isinstance(row["jpg"], np.ndarray) else np.asarray(Image.open(io.BytesIO(row["jpg"])))
    assert image.shape[:2] == (48, 64)
    record = row["json"] if isinstance(row["json"], dict) else json.loads(row["json"])
    assert mask_utils.decode(record["annotations"][0]["segmentation"]).shape == (48, 64)


def test_manifest_parts_commit_atomically_and_list_committed_units(tmp_path):
    out = str(tmp_path)
    row = {"key": "a", "image_id": 1, "shard": "sa_000002.tar", "source": "/x/a.jpg", "source_sha256": "", "width": 4,
           "height": 4, "num_masks": 0, "model_sha256": "0" * 64, "status": manifest.STATUS_OK, "blurred_regions": None}
    assert manifest.committed_units(out) == set()
    manifest.write_part(out, manifest.MANIFEST_DIR, 2, [row])
    manifest.write_part(out, manifest.ERRORS_DIR, 2, [])
    (tmp_path / "manifest" / ".part_000005.parquet.tmp-dead").write_bytes(b"half")
    assert manifest.committed_units(out) == {2}
    assert manifest.read_table(out).to_pylist() == [row]
    assert manifest.read_table(out, manifest.ERRORS_DIR).num_rows == 0
