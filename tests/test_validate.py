"""+stage=validate on clean and deliberately broken shards."""
from __future__ import annotations

import re
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest

from pipeline.dataset.rle import rle_counts
from pipeline.stages import run_stage

from .dataset_factory import REPO, compose, make_dataset
from .test_stats import FOREIGN, add_members

LINE = re.compile(r"^PROBLEM shard=(\S+) key=(\S+) \[(\w+)\] (.*)$", re.M)


def corrupt(sample) -> None:
    """One problem per key, each a different check."""
    anns = sample.record["annotations"]
    if sample.key == "synthetic_000001":
        anns[0]["area"] += 5
    elif sample.key == "synthetic_000002":
        anns[1]["segmentation"]["counts"] = "zzzz"  # outside the RLE alphabet
    elif sample.key == "synthetic_000004":
        # A well-formed RLE of a 10x10 mask under the image's size: parses, does not tile.
        small = mask_utils.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))
        anns[2]["segmentation"]["counts"] = small["counts"].decode()
    elif sample.key == "synthetic_000005":
        anns[0]["id"] = 1  # the id of synthetic_000001's first mask
    elif sample.key == "synthetic_000006":
        anns[2]["bbox"][2] += 5
    elif sample.key == "synthetic_000007":
        del anns[0]["predicted_iou"]
    elif sample.key == "synthetic_000008":
        anns.pop()  # the manifest, written from the true samples, still counts it
    elif sample.key == "synthetic_000009":
        sample.record["image"]["width"] += 1
    elif sample.key == "synthetic_000010":
        sample.record["image"]["image_id"] = 2  # the image id of synthetic_000002
    elif sample.key == "synthetic_000003":
        sample.record["image"]["exposure_s"] = float("nan")  # json.dumps writes NaN; JSON has no such number


EXPECTED = {
    ("sa_000000.tar", "synthetic_000001", "area"),
    ("sa_000000.tar", "synthetic_000002", "rle"),
    ("sa_000001.tar", "synthetic_000004", "rle"),
    ("sa_000000.tar", "synthetic_000001", "unique"),
    ("sa_000001.tar", "synthetic_000005", "unique"),
    ("sa_000001.tar", "synthetic_000006", "bbox"),
    ("sa_000002.tar", "synthetic_000007", "schema"),
    ("sa_000002.tar", "synthetic_000008", "manifest"),
    ("sa_000002.tar", "synthetic_000009", "image"),
    ("sa_000000.tar", "synthetic_000002", "unique"),
    ("sa_000003.tar", "synthetic_000010", "unique"),
    ("sa_000000.tar", "synthetic_000003", "json"),
    ("sa_000003.tar", "synthetic_000011", "tar"),  # cut inside this key's JPEG
    ("sa_000004.tar", "-", "tar"),  # cut at a member boundary: no end-of-archive marker
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate") / "broken"
    dataset = make_dataset(root, num_shards=5, images_per_shard=3, mutate=corrupt)
    cut_inside = dataset.shard_path(3)
    with tarfile.open(cut_inside) as tar:
        jpg = tar.getmember("synthetic_000011.jpg")
    cut_inside.write_bytes(cut_inside.read_bytes()[: jpg.offset_data + jpg.size // 2])
    cut_boundary = dataset.shard_path(4)
    with tarfile.open(cut_boundary) as tar:
        offset = tar.getmembers()[2].offset
    cut_boundary.write_bytes(cut_boundary.read_bytes()[:offset])
    return dataset


def test_rle_counts_round_trip():
    rng = np.random.default_rng(0)
    mask = np.asfortranarray(rng.random((31, 17)) > 0.6).astype(np.uint8)
    runs = rle_counts(mask_utils.encode(mask)["counts"].decode())
    assert sum(runs) == mask.size
    assert sum(runs[1::2]) == mask.sum()
    flat = mask.flatten(order="F")
    assert runs[0] == np.argmax(flat)  # the first run counts zeros


@pytest.mark.parametrize("layout", ["project", "sa1b"])
def test_clean_dataset_passes(tmp_path, capsys, layout):
    dataset = make_dataset(tmp_path / "clean", num_shards=2, layout=layout)
    summary = run_stage(compose("validate", dataset.root, overrides=["stage.parallel=local"]))
    assert summary["problems"] == 0
    assert summary["images"] == len(dataset.samples)
    assert summary["annotations"] == sum(len(s.masks) for s in dataset.samples)
    assert "PROBLEM" not in capsys.readouterr().out


def test_every_problem_is_reported_with_shard_and_key(broken, tmp_path, capsys):
    cfg = compose("validate", broken.root, tmp_path / "report", overrides=["stage.parallel=local"])
    with pytest.raises(SystemExit) as exit_info:
        run_stage(cfg)
    assert exit_info.value.code == 1
    printed = LINE.findall(capsys.readouterr().out)
    found = {(shard, key, check) for shard, key, check, _ in printed}
    assert EXPECTED <= found, EXPECTED - found
    messages: dict[tuple[str, str], str] = {}
    for _, key, check, message in printed:
        messages[key, check] = messages.get((key, check), "") + message + "\n"
    true_area = int(broken.sample("synthetic_000001").masks[0].sum())
    assert f"area {true_area + 5} but the decoded mask has {true_area}" in messages[
        ("synthetic_000001", "area")]
    assert "does not parse" in messages[("synthetic_000002", "rle")]
    assert "covers 100 pixels" in messages[("synthetic_000004", "rle")]
    assert "predicted_iou" in messages[("synthetic_000007", "schema")]
    assert ("synthetic_000007", "manifest") not in messages  # one problem, reported once
    assert "num_masks" in messages[("synthetic_000008", "manifest")]
    assert "image id 2 occurs 2 times" in messages[("synthetic_000010", "unique")]
    assert "unexpected end of data" in messages[("synthetic_000011", "tar")]
    assert "no end-of-archive marker" in "".join(m for _, k, c, m in printed if k == "-")
    assert "image/exposure_s: a non-finite number" in messages[("synthetic_000003", "json")]
    written = pd.read_parquet(tmp_path / "report" / "validate" / "problems.parquet")
    assert len(written) == len(printed)


def test_command_line_exits_non_zero_on_ray(broken, tmp_path):
    """The real entry point, with the shards checked in Ray tasks."""
    args = [sys.executable, "-m", "pipeline.run", "+stage=validate", f"input={broken.root}",
            "stage.parallel=ray", "cluster.num_cpus=2", f"hydra.run.dir={tmp_path}/hydra"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    found = {(shard, key, check) for shard, key, check, _ in LINE.findall(result.stdout)}
    assert EXPECTED <= found, EXPECTED - found


def test_foreign_json_members_are_reported_with_shard_and_key(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "dataset", num_shards=1, images_per_shard=2)
    add_members(dataset.shard_path(0), FOREIGN)
    with pytest.raises(SystemExit):
        run_stage(compose("validate", dataset.root, overrides=["stage.parallel=local"]))
    found = {(shard, key, check) for shard, key, check, _ in LINE.findall(capsys.readouterr().out)}
    for key, check in (("caption_1", "schema"), ("listed", "schema"), ("flat", "schema"), ("cut", "json")):
        assert ("sa_000000.tar", key, check) in found, (key, found)


def test_problems_on_s3_and_no_empty_table(s3_env, broken, tmp_path, monkeypatch, capsys):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("validate-bucket")
    fs.put(str(broken.root) + "/", "validate-bucket/broken/", recursive=True)
    clean = make_dataset(tmp_path / "clean", num_shards=1)
    fs.put(str(clean.root) + "/", "validate-bucket/clean/", recursive=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_stage(compose("validate", "s3://validate-bucket/broken", "s3://validate-bucket/report",
                          overrides=["stage.parallel=local"]))
    printed = LINE.findall(capsys.readouterr().out)
    fs.invalidate_cache()
    written = pq.read_table("validate-bucket/report/validate/problems.parquet", filesystem=fs)
    assert written.num_rows == len(printed) > 0
    assert EXPECTED <= {(r["shard"], r["key"] or "-", r["check"]) for r in written.to_pylist()}
    assert not (tmp_path / "s3:").exists()
    # A clean run over the same report folder: no problems, so no (empty) table.
    summary = run_stage(compose("validate", "s3://validate-bucket/clean", "s3://validate-bucket/report",
                                overrides=["stage.parallel=local"]))
    assert summary["problems"] == 0
    fs.invalidate_cache()
    assert not fs.exists("validate-bucket/report/validate/problems.parquet")
