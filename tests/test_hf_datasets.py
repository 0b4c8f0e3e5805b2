"""Hugging Face ``datasets`` reads what we write: ``load_dataset(<root>)`` on a dataset
with its manifest, error and statistics tables yields the images with their SA-1B
records (the card's ``configs``), and no table we write is empty."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.dataset import manifest
from pipeline.stages import run_stage

from .dataset_factory import compose, make_dataset, write_shard


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """datasets caches every load; keep it out of the home directory."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def front_matter(card: Path) -> dict:
    return yaml.safe_load(card.read_text().split("---")[1])


def assert_loads_as(root: Path, samples) -> None:
    """``load_dataset(root)`` gives exactly ``samples``: pixels' size, key, record."""
    from datasets import load_dataset

    loaded = load_dataset(str(root))
    assert list(loaded) == ["train"]
    train = loaded["train"]
    assert sorted(train.column_names) == ["__key__", "__url__", "jpg", "json"]
    by_key = {row["__key__"]: row for row in train}
    assert sorted(by_key) == sorted(s.key for s in samples), "every committed image once, nothing else"
    for s in samples:
        row = by_key[s.key]
        assert row["jpg"].size == (s.image.shape[1], s.image.shape[0])
        assert row["json"]["image"] == s.record["image"]
        got = row["json"]["annotations"]
        assert [a["id"] for a in got] == [a["id"] for a in s.record["annotations"]]
        assert [a["segmentation"] for a in got] == [a["segmentation"] for a in s.record["annotations"]]
        assert [a["point_coords"] for a in got] == [a["point_coords"] for a in s.record["annotations"]]


def test_load_dataset_of_the_root_reads_the_shards_only(tmp_path):
    from datasets import load_dataset

    dataset = make_dataset(tmp_path / "dataset", num_shards=2, images_per_shard=3)
    root = dataset.root
    # A unit with failures and one without, as fully_auto writes them.
    manifest.write_part(str(root), manifest.ERRORS_DIR, 0, [
        {"key": "broken", "source": "in/broken.jpg", "stage": "decode", "reason": "truncated"}])
    manifest.write_part(str(root), manifest.ERRORS_DIR, 1, [])
    assert sorted(os.listdir(root / "errors")) == ["part_000000.parquet"], "no empty table"
    run_stage(compose("stats", root, overrides=["stage.parallel=local", "stage.license=cc-by-4.0"]))

    front = front_matter(root / "README.md")
    assert front["license"] == "cc-by-4.0"
    assert front["configs"] == [{"config_name": "default", "default": True,
                                 "data_files": [{"split": "train", "path": ["shards/*.tar"]}]}]
    assert_loads_as(root, dataset.samples)
    # The README's split="train" call, and the tables as tables.
    assert len(load_dataset(str(root), split="train")) == len(dataset.samples)
    assert len(load_dataset("parquet", data_files=str(root / "manifest" / "*.parquet"), split="train")) \
        == len(dataset.samples)
    errors = load_dataset("parquet", data_dir=str(root / "errors"), split="train")
    assert errors["key"] == ["broken"]
    masks = load_dataset("parquet", data_files=str(root / "stats" / "masks.parquet"), split="train")
    assert len(masks) == sum(len(s.masks) for s in dataset.samples)


def test_a_stale_errors_part_goes_when_the_unit_reruns_clean(tmp_path):
    root = str(tmp_path)
    row = {"key": "k", "source": "s", "phase": "decode", "reason": "truncated"}
    manifest.write_part(root, manifest.ERRORS_DIR, 3, [row])
    assert manifest.read_table(root, manifest.ERRORS_DIR).to_pylist() == [row]
    manifest.write_part(root, manifest.ERRORS_DIR, 3, [])
    assert manifest.read_table(root, manifest.ERRORS_DIR).num_rows == 0
    assert not (tmp_path / "errors" / "part_000003.parquet").exists()


def test_an_uncommitted_shard_is_not_in_the_card(tmp_path):
    """A killed run's shard (no manifest part) must not be read by load_dataset."""
    dataset = make_dataset(tmp_path / "dataset", num_shards=2, images_per_shard=2)
    stray = make_dataset(tmp_path / "stray", num_shards=1, images_per_shard=2, seed=7)
    for s in stray.samples:
        s.key = s.key.replace("synthetic", "stray")
        s.record["image"]["file_name"] = f"{s.key}.jpg"
    write_shard(dataset.root / "shards" / "sa_000002.tar", stray.samples)
    run_stage(compose("stats", dataset.root, overrides=["stage.parallel=local"]))
    files = front_matter(dataset.root / "README.md")["configs"][0]["data_files"][0]["path"]
    assert files == ["shards/sa_000000.tar", "shards/sa_000001.tar"]
    assert_loads_as(dataset.root, dataset.samples)


def test_sa1b_download_with_the_card_elsewhere(tmp_path):
    """Stats of a read-only SA-1B folder into output=: the card points at the tars."""
    dataset = make_dataset(tmp_path / "sa1b", num_shards=2, images_per_shard=2, layout="sa1b")
    out = tmp_path / "out"
    run_stage(compose("stats", dataset.root, out, overrides=["stage.parallel=local"]))
    files = front_matter(out / "README.md")["configs"][0]["data_files"][0]["path"]
    assert files == [f"{dataset.root}/*.tar"]
    assert_loads_as(out, dataset.samples)


def test_the_card_shows_the_reports_figures(tmp_path):
    dataset = make_dataset(tmp_path / "dataset", num_shards=1, images_per_shard=3)
    run_stage(compose("stats", dataset.root, overrides=["stage.parallel=local"]))
    card = (dataset.root / "README.md").read_text()
    links = [line[line.index("](") + 2 : -1] for line in card.splitlines() if line.startswith("![")]
    assert len(links) == 6
    for link in links:
        with Image.open(io.BytesIO((dataset.root / link).read_bytes())) as figure:
            assert figure.format == "PNG" and figure.size[0] > 300
    assert front_matter(dataset.root / "README.md")["license"] == "unknown"
    assert "stage.license=" in card
    json.dumps(front_matter(dataset.root / "README.md"))  # plain YAML types only
