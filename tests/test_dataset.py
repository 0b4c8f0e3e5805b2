"""Every reader lists committed units through pipeline.dataset.listing and reads only what it uses."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest

from pipeline.dataset import listing as dataset
from pipeline.dataset import manifest
from pipeline.dataset.shards import ShardWriter, iter_shard, shard_name
from pipeline.stages import run_stage

MARKER = "pwned.txt"


class _Exploit:
    """Unpickling this writes a file: proof that a reader executed data."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "executed"))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _hostile_shard(path: Path, jpeg: bytes, record: dict, marker: Path) -> None:
    """An SA-1B sample plus members that webdataset's default decoders would run."""
    import torch

    evil = pickle.dumps(_Exploit(str(marker)))
    pth = io.BytesIO()
    torch.save({"x": _Exploit(str(marker))}, pth)
    with tarfile.open(path, "w") as tar:
        for ext, data in (("jpg", jpeg), ("json", json.dumps(record).encode()), ("pyd", evil),
                          ("pickle", evil), ("pth", pth.getvalue())):
            _add_member(tar, f"sa_1.{ext}", data)


def test_reading_a_hostile_shard_executes_nothing(generated_sample, tmp_path):
    jpeg, record = generated_sample
    marker = tmp_path / MARKER
    shard = tmp_path / "sa_000000.tar"
    _hostile_shard(shard, jpeg, record, marker)
    samples = list(iter_shard(str(shard)))
    assert [s.key for s in samples] == ["sa_1"] and samples[0].record == record
    assert not marker.exists()
    # Retrain, eval and loop read shards as training data and ground truth.
    from pipeline.dataset.filters import MaskFilter
    from pipeline.stages import loop
    from pipeline.truth.ground_truth import ShardMasks

    assert len(list(ShardMasks([str(shard)]))) == 1
    assert loop.kept_masks(shard, MaskFilter()) == (1, 1)
    assert not marker.exists()
    # The stages that read shards: stats, the exports, validate (and retrain/eval/loop
    # through the same reader).
    for stage in ("stats", "export_coco", "export_yolo", "export_label_studio", "validate"):
        try:
            run_stage(_compose(stage, shard, tmp_path / stage))
        except SystemExit:
            pass  # validate exits 1: the extra members are problems to report
        assert not marker.exists(), f"{stage} executed a shard member"


def test_uncommitted_shards_are_ignored_and_reported(generated_sample, tmp_path, caplog):
    jpeg, record = generated_sample
    root = tmp_path / "ds"
    for unit in (0, 1):
        with ShardWriter(str(root / "shards" / shard_name(unit))) as shard:
            shard.write(f"sa_{unit + 1}", jpeg, {**record, "image": {**record["image"], "image_id": unit + 1}})
    manifest.write_part(str(root), manifest.MANIFEST_DIR, 0, [])  # unit 1: killed before its commit
    listing = dataset.list_shards(str(root))
    assert [Path(p).name for p in listing.committed] == ["sa_000000.tar"]
    assert [Path(p).name for p in listing.uncommitted] == ["sa_000001.tar"]
    assert "sa_000001.tar" in caplog.text
    assert [s.key for s in dataset.iter_samples(str(root))] == ["sa_1"]
    # An SA-1B download (no manifest) is read whole; nothing committed is an error.
    assert len(dataset.committed_shards(str(root / "shards"))) == 2
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        dataset.committed_shards(str(tmp_path / "ds" / "manifest"))


@pytest.fixture
def generated_sample():
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    mask = np.zeros((48, 64), np.uint8, order="F")
    mask[10:20, 5:30] = 1
    rle = mask_utils.encode(mask)
    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(buffer, format="JPEG")
    record = {"image": {"image_id": 1, "width": 64, "height": 48, "file_name": "sa_1.jpg"},
              "annotations": [{"id": 1_000_000, "segmentation": {"size": [48, 64], "counts": rle["counts"].decode()},
                               "bbox": [5.0, 10.0, 24.0, 9.0], "area": 250, "predicted_iou": 0.9,
                               "stability_score": 0.95, "crop_box": [0.0, 0.0, 64.0, 48.0],
                               "point_coords": [[10.0, 15.0]]}]}
    return buffer.getvalue(), record


def _compose(stage: str, shard: Path, out: Path):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"+stage={stage}", f"input={shard}", f"output={out}"])


def test_an_untarred_shard_reads_the_way_sam2_reads_sa1b(compose_config, tmp_path, tiny_checkpoint, ray_local):
    """SAM 2's SA-1B loader lists a folder of sa_<id>.jpg / sa_<id>.json, parses the id
    from the name and decodes the masks with pycocotools: so does this test."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    from tests.conftest import encode, scene
    from tests.test_fully_auto import overrides

    inp = tmp_path / "images"
    inp.mkdir()
    for n in range(3):
        (inp / f"holiday photo {n}.jpg").write_bytes(encode(Image.fromarray(scene(64, 48, n)), "JPEG"))
    out = tmp_path / "out"
    run_stage(compose_config(*overrides(inp, out, tiny_checkpoint, "stage.images_per_unit=3")))
    folder = tmp_path / "untarred"
    with tarfile.open(out / "shards" / "sa_000000.tar") as tar:
        tar.extractall(folder, filter="data")
    images = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")
    assert len(images) == 3
    for image in images:
        image_id = int(image.stem.split("_")[-1])  # SAM 2: the id is the name's last part
        record = json.loads((folder / f"sa_{image_id}.json").read_text())
        assert record["image"]["image_id"] == image_id and record["image"]["file_name"] == image.name
        assert record["image"]["source"].endswith(".jpg") and len(record["image"]["source_sha256"]) == 64
        height, width = np.asarray(Image.open(image)).shape[:2]
        for annotation in record["annotations"]:
            if annotation["area"] > 0:  # SAM 2 keeps masks with area > 0
                assert mask_utils.decode(annotation["segmentation"]).shape == (height, width)
